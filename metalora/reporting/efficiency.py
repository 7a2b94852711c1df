"""Efficiency accounting of trained runs, read from what the runs measured (never estimated)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from metalora.errors import MetaloraError
from metalora.training.checkpoints import directory_bytes, latest_checkpoint

EFFICIENCY_COLUMNS = [
    "method", "train_seed", "run_dir", "steps", "example_gradients", "time_per_step_s", "tokens_per_s",
    "peak_memory_mb", "memory_measure", "trainable_parameters", "final_weights_bytes", "checkpoint_bytes", "device",
    "processes",
]  # fmt: skip


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """A run's metrics.jsonl as a frame (one row per step); empty when the file is absent."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return pd.DataFrame()
    if Path(run_dir).resolve() not in path.resolve().parents:
        raise MetaloraError(f"{path}: links outside its run directory (to {path.resolve()}); a run's record is its own")
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def run_efficiency(method: str, run_dir: str | Path, train_seed: int = -1) -> dict[str, object]:
    """One run's efficiency row.

    Time per step and tokens/s are medians over the logged steps after the first (which pays for
    warm-up); peak memory is the largest logged value.

    Args:
        run_dir: a finished run directory (summary.json and metrics.jsonl).

    Returns:
        A dict with EFFICIENCY_COLUMNS as keys.
    """
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_metrics(run_dir)
    steady = metrics.iloc[1:] if len(metrics) > 1 else metrics
    checkpoint = latest_checkpoint(run_dir)

    def median(column: str) -> float:
        return float(np.median(steady[column])) if column in steady else float("nan")

    return {
        "method": method,
        "train_seed": train_seed,
        "run_dir": str(run_dir),
        "steps": summary["steps"],
        "example_gradients": summary.get("example_gradients"),
        "time_per_step_s": median("system/time_per_step_s"),
        "tokens_per_s": median("system/tokens_per_s"),
        "peak_memory_mb": float(metrics["system/peak_memory_mb"].max()) if len(metrics) else float("nan"),
        # CUDA: max allocated by torch; CPU: the training process's peak resident set size.
        "memory_measure": "cuda_max_allocated" if str(summary.get("device", "")).startswith("cuda") else "peak_rss",
        "trainable_parameters": summary["trainable_parameters"],
        "final_weights_bytes": summary["final_weights_bytes"],
        "checkpoint_bytes": directory_bytes(checkpoint) if checkpoint else 0,
        "device": summary.get("device"),
        "processes": summary.get("processes"),
    }


def efficiency_table(runs: list[tuple[str, int, Path]]) -> pd.DataFrame:
    """Efficiency rows of several runs, given as (method, training seed, run directory); columns EFFICIENCY_COLUMNS."""
    return pd.DataFrame([run_efficiency(m, d, s) for m, s, d in runs], columns=EFFICIENCY_COLUMNS)
