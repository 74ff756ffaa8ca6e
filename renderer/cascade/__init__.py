"""What a rank runs: the worker that holds the model, the stage loop over row strips, the cascade's stages and their
schedulers."""
