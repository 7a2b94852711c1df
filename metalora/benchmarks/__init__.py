"""Benchmark scripts: each measures and prints figures (and writes JSON); none asserts a time."""
