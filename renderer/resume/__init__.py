"""A render that stops and goes on: checkpoints, clean stops on signals, and recovery after a lost rank."""
