"""Exact row-sharded rendering on a Ray cluster: a coordinator and a gang of workers (distributed-design.md)."""
