"""Whole experiments: `metalora eval` (train what is missing, evaluate, report), sweeps, notebook helpers."""
