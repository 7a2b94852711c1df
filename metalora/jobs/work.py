"""What a job runs: a training run, an evaluation shard, the evaluation's tables and report, sweep points.

Each is a submitit `Checkpointable`: a job SLURM warns of its time limit (SIGUSR2) is requeued with the same
arguments, and every one of them continues from its run directory when it starts again. A training job first
finishes the step in progress and checkpoints it, so a requeue loses no step; the others lose at most the point or
sweep point in progress.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import submitit
import torch

from metalora.config import load_config
from metalora.experiments.compare import run_evaluation
from metalora.experiments.sweep import is_finished, load_sweep, point_config, run_point, sweep_dir, sweep_points
from metalora.reporting.report import write_report
from metalora.training.checkpoints import latest_checkpoint
from metalora.training.rundir import RUN_FILES
from metalora.training.train import TrainingStopped, train

# Executors whose jobs are processes of their own, with their own CPUs and signals (not `debug`, which runs in the
# caller's process).
OWN_PROCESS = ("slurm", "local")


def job_environment() -> submitit.JobEnvironment | None:
    """The job this code runs in, or None outside a job of its own process."""
    try:
        environment = submitit.JobEnvironment()
    except RuntimeError:  # not started by submitit
        return None
    return environment if environment.cluster in OWN_PROCESS else None


def use_allocated_cpus(cpus_per_task: int) -> None:
    """Give torch (and the processes this job starts) as many threads as the job has CPUs: SLURM's count when it
    says one, else the cluster group's. Two jobs on a 2-CPU node then run one thread each instead of two apiece."""
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", cpus_per_task))
    torch.set_num_threads(cpus)
    os.environ["OMP_NUM_THREADS"] = str(cpus)


@contextmanager
def stop_requested_by_signal(signum: signal.Signals = signal.SIGUSR2) -> Iterator[Callable[[], bool]]:
    """While inside, `signum` (SLURM's time-limit warning as submitit asks for it) only raises a flag, read by the
    returned function; submitit's own handler, which requeues at once, is restored on the way out."""
    raised = threading.Event()
    previous = signal.signal(signum, lambda *_: raised.set())
    try:
        yield raised.is_set
    finally:
        signal.signal(signum, previous)


def set_aside_unresumable(run_dir: Path) -> Path | None:
    """Move a run directory that holds a run's files but no checkpoint (killed before its first) out of the way, so
    that the job starts the run from the beginning; nothing is deleted. Returns where it went."""
    if latest_checkpoint(run_dir) is not None or not any((run_dir / name).exists() for name in RUN_FILES):
        return None
    aside = run_dir.with_name(f"{run_dir.name}.before-first-checkpoint-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    return aside


class TrainingJob(submitit.helpers.Checkpointable):
    """One training run of a plan, from its config file: from its latest checkpoint when it has one, else from the
    beginning. Near its time limit it checkpoints the step in progress and requeues itself."""

    def __call__(self, config_path: str) -> str:
        cfg = load_config([config_path])
        environment = job_environment()
        if environment is None:
            train(cfg, resume=latest_checkpoint(cfg.run_dir) is not None)
            return str(cfg.run_dir)
        use_allocated_cpus(cfg.cluster.cpus_per_task)
        if environment.num_tasks > 1:
            # The process group from SLURM's own variables (MASTER_ADDR, RANK, WORLD_SIZE, ...), read by accelerate.
            # Each process keeps every GPU of its node visible: accelerate picks the one of its local rank.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if environment.global_rank == 0:
            aside = set_aside_unresumable(cfg.run_dir)
            if aside is not None:
                print(f"{cfg.run_dir} held a run stopped before its first checkpoint: kept as {aside.name}")
        with stop_requested_by_signal() as stop:
            try:
                train(cfg, resume=latest_checkpoint(cfg.run_dir) is not None, stop=stop)
                return str(cfg.run_dir)
            except TrainingStopped as stopped:
                print(stopped)
        # submitit's handler is back: raised on the first process, it calls `checkpoint` and requeues the whole job.
        if environment.global_rank == 0:
            signal.raise_signal(signal.SIGUSR2)
        return "stopped"


class EvaluationShardJob(submitit.helpers.Checkpointable):
    """Share `index` of `count` of an evaluation's points, journaled as they are scored; a restart scores only the
    points its journal lacks."""

    def __call__(self, config_path: str, index: int, count: int) -> str:
        cfg = load_config([config_path])
        if job_environment() is not None:
            use_allocated_cpus(cfg.cluster.cpus_per_task)
        return str(run_evaluation(cfg, shard=(index, count)))


class ReportJob(submitit.helpers.Checkpointable):
    """The evaluation's tables, statistics and figures from its journal (refused, naming the missing points, unless
    every point is there), then report.md and report.html."""

    def __call__(self, config_path: str) -> str:
        cfg = load_config([config_path])
        out = run_evaluation(cfg, score=False)
        if (cfg.run_dir / "config.yaml").is_file():
            write_report(cfg.run_dir, html=True)
        return str(out)


class SweepPointsJob(submitit.helpers.Checkpointable):
    """Sweep points, one after another: each is skipped when finished with its config, else run by papermill and
    recorded in its point.json (a failed point is recorded and the next one runs)."""

    def __call__(self, sweep_path: str, names: list[str], kernel: str | None) -> list[str]:
        spec = load_sweep(sweep_path)
        if job_environment() is not None:
            use_allocated_cpus(load_config(spec.config_files, spec.overrides).cluster.cpus_per_task)
        statuses = []
        for point in (p for p in sweep_points(spec) if p.name in names):
            if is_finished(sweep_dir(spec) / point.name, point_config(spec, point)):  # a requeued job's earlier work
                statuses.append("ok")
            else:
                statuses.append(run_point(spec, point, kernel)["status"])
        return statuses
