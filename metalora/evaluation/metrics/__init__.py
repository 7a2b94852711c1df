"""Metric modules loaded through `evaluate.load` from a local path (no hub access needed)."""
