"""What the per-item answers (`eval/samples.parquet`) cost on disk: an evaluation's samples file, its rows and bytes per
row, beside the size of its results table.

    python -m metalora.benchmarks.samples_size [params.yaml ...] [a.b=value ...] [--output DIR]

It runs `metalora eval` as configured (train what is missing first, e.g. with `metalora eval --train-missing`, or
evaluate untrained methods only) into DIR and reads the files it wrote. Bytes per row times a plan's scored items
(points x `eval.max_test`) gives that plan's samples file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from metalora.config import load_config, split_args
from metalora.evaluation.samples import POINT_COLUMNS, SAMPLES_FILE
from metalora.experiments.compare import run_evaluation
from metalora.machine import describe_machine, machine_line


def main(argv: list[str] | None = None) -> int:
    """Print the samples file's size; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="*", help="YAML files then a.b=value overrides")
    parser.add_argument("--output", default="outputs/bench/samples_size", help="train.output_dir of the evaluation")
    args = parser.parse_args(argv)
    files, overrides = split_args(args.config)
    cfg = load_config(files or ["params/base.yaml", "params/demo.yaml"], [f"train.output_dir={args.output}",
                                                                          *overrides])  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    eval_dir = Path(run_evaluation(cfg))
    samples = pd.read_parquet(eval_dir / SAMPLES_FILE)
    size = (eval_dir / SAMPLES_FILE).stat().st_size
    results = (eval_dir / "results.csv").stat().st_size
    points = samples.groupby(POINT_COLUMNS).ngroups
    print(machine_line(describe_machine()))
    print(f"{len(samples)} items of {points} points; mean prompt {samples['prompt'].str.len().mean():.0f} characters")
    print(f"{SAMPLES_FILE}: {size:,} bytes, {size / len(samples):.1f} bytes per item (results.csv: {results:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
