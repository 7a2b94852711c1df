"""`metalora sweep`: a sweep's unfinished points as jobs (one per point), then the aggregate tables and figures.

On SLURM every point is a job of one array and the aggregation a job that waits for them; the command returns at
once. On this machine the points run as child processes side by side (one per GPU given by `--devices`, else one
per slot of CPUs) or, with the debug executor, one after another in this process; the aggregation follows.
"""

from __future__ import annotations

from pathlib import Path

import submitit

from metalora.config import ConfigError, load_config
from metalora.experiments.sweep import aggregate_sweep, load_sweep, sweep_dir, todo_points
from metalora.io import atomic_write_text
from metalora.jobs.executor import single_process_shape
from metalora.jobs.submit import Stage, Submission, run_stages
from metalora.jobs.work import SweepPointsJob


class AggregateSweepJob(submitit.helpers.Checkpointable):
    """The sweep's results.csv, summary.csv, points.csv and figures from the points' directories."""

    def __call__(self, root: str) -> str:
        aggregate_sweep(root)
        return root


def run_sweep(
    path: str | Path, kernel: str | None = None, executor: str | None = None, devices: list[int] | None = None
) -> tuple[Path, Submission]:
    """Run (or, on SLURM, submit) every unfinished point of a sweep, then aggregate.

    Args:
        kernel: Jupyter kernel name for papermill (default: the notebook's).
        executor: slurm, local or debug (default: the `cluster.executor` of the sweep's parameter files).
        devices: GPUs of this machine for the local executor, one point per GPU at a time.

    Returns:
        The sweep directory and what was submitted.
    """
    path = Path(path).resolve()
    spec = load_sweep(path)
    chosen = [f"cluster.executor={executor}"] if executor is not None else []
    cfg = load_config(spec.config_files, [*spec.overrides, *chosen])
    if devices and cfg.cluster.executor != "local":
        raise ConfigError(f"--devices spreads points over this machine's GPUs: it needs the local executor, not "
                          f"{cfg.cluster.executor}")  # fmt: skip
    root = sweep_dir(spec)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "sweep.yaml", path.read_text())
    points = [(SweepPointsJob(), (str(path), [point.name], kernel)) for point in todo_points(spec)]
    stages = [
        ("sweep points", Stage(single_process_shape(cfg.cluster, "sweep", gpu=True), points)),
        ("aggregation", Stage(single_process_shape(cfg.cluster, "aggregate", gpu=False),
                              [(AggregateSweepJob(), (str(root.resolve()),))])),
    ]  # fmt: skip
    return root, run_stages(cfg, root / "jobs", stages, devices)
