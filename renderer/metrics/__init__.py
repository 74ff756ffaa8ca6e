"""Prometheus metrics: the specs, the recorder every part records through, and its backends."""
