"""The `toy` model's world: procedural scenes, its training script, and the metrics that judge renders."""
