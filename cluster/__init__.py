"""Exact row-sharded rendering on a Ray cluster: a gang of workers that does all of a render's model work for its driver (docs/architecture.md)."""
