"""`metalora submit`: what `metalora plan` lists, submitted as jobs.

Three stages: every training run still to finish (one job each, a job array on SLURM), the evaluation's points
dealt over `cluster.eval_shards` jobs, and one job that writes `eval/` and the report once every point is there.
On SLURM each stage waits for the one before through a dependency (afterok) and the command returns at once; the
local and debug executors run the stages in turn and return when the last is done.

On the local executor, a stage's jobs are dealt over as many child processes as the machine has slots (its GPUs
given by `--devices`, else its CPUs over `cluster.cpus_per_task`), each running its jobs one after another: submitit
starts every local job at once and would otherwise put them all on the same GPU or CPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit

from metalora.config import TRAINED_METHODS, Config, ConfigError, save_config
from metalora.errors import MetaloraError
from metalora.experiments.runs import config_for_method, method_run_dir, training_seeds
from metalora.jobs.executor import JobShape, check_slurm_request, make_executor, single_process_shape, training_shape
from metalora.jobs.work import EvaluationShardJob, ReportJob, TrainingJob


class JobFailedError(MetaloraError):
    """A job of a stage run by the local or debug executor failed; the later stages were not started."""


@dataclass
class Stage:
    """Jobs of one kind: each a callable and its arguments, and the shape every one of them asks for."""

    shape: JobShape
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]


class JobSequence(submitit.helpers.Checkpointable):
    """Several jobs run one after another in one job (the local executor's share of a stage). Requeued, it runs
    them all again: each continues from its run directory, so finished ones return at once."""

    def __call__(self, calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
        return [function(*arguments) for function, arguments in calls]


@dataclass
class Submission:
    """What was submitted: the executor, where its files and logs are, and the job ids of each stage."""

    executor: str
    log_dir: Path
    stages: dict[str, list[str]] = field(default_factory=dict)

    def describe(self, progress_command: str) -> str:
        """Job ids, the log folder, and how to follow the work."""
        lines = [f"{name}: {', '.join(ids) if ids else 'nothing to do'}" for name, ids in self.stages.items()]
        lines.append(f"job files and logs: {self.log_dir}/<job id>_*")
        if self.executor == "slurm":
            lines.append(f"follow: squeue --me; progress from the run directories: {progress_command}")
        return "\n".join(lines)


def log_dir(cfg: Config) -> Path:
    """Where job files, configs and logs of a plan go: `cluster.log_dir`, else <output_dir>/jobs/<run_name>."""
    if cfg.cluster.log_dir:
        return Path(cfg.cluster.log_dir)
    return Path(cfg.train.output_dir) / "jobs" / cfg.train.run_name


def plan_stages(cfg: Config, folder: Path) -> list[tuple[str, Stage]]:
    """The plan's stages, with each job's config written under `folder/configs/` (a job reads its config from there,
    so a resubmission needs nothing but these files)."""
    configs = folder / "configs"
    training: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    for method in (m for m in cfg.eval.methods if m in TRAINED_METHODS and m not in cfg.eval.runs):
        for seed in training_seeds(cfg):
            run_dir = method_run_dir(cfg, method, seed)
            if (run_dir / "summary.json").is_file():
                continue
            path = save_config(config_for_method(cfg, method, seed), configs / run_dir.name)
            training.append((TrainingJob(), (str(path),)))
    evaluation = str(save_config(cfg, configs / "evaluation"))
    shards = cfg.cluster.eval_shards
    return [
        ("training", Stage(training_shape(cfg.cluster), training)),
        ("evaluation", Stage(single_process_shape(cfg.cluster, "eval", gpu=True),
                             [(EvaluationShardJob(), (evaluation, index, shards)) for index in range(shards)])),
        ("report", Stage(single_process_shape(cfg.cluster, "report", gpu=False), [(ReportJob(), (evaluation,))])),
    ]  # fmt: skip


def submit_plan(cfg: Config, devices: list[int] | None = None) -> Submission:
    """Submit the plan of `cfg` on `cfg.cluster.executor` (the local executor on `devices`, when given).

    Raises:
        ConfigError: SLURM refuses the jobs' request (nothing is submitted then).
        JobFailedError: a local or debug job failed (the later stages are not started).
    """
    folder = log_dir(cfg)
    stages = plan_stages(cfg, folder)
    return run_stages(cfg, folder, stages, devices)


def run_stages(cfg: Config, folder: Path, stages: list[tuple[str, Stage]], devices: list[int] | None) -> Submission:
    """Submit stages in order: on SLURM each depending on the one before, elsewhere each finished before the next."""
    cluster = cfg.cluster
    if cluster.executor == "slurm":
        check_slurm_request(cluster, [stage.shape for _, stage in stages])
    submission = Submission(cluster.executor, folder)
    after: tuple[str, ...] = ()
    for name, stage in stages:
        if not stage.calls:
            submission.stages[name] = []
            continue
        if cluster.executor == "slurm":
            executor = make_executor(cluster, folder, replace(stage.shape, after=after))
            with executor.batch():
                jobs = [executor.submit(function, *arguments) for function, arguments in stage.calls]
            after = tuple(job.job_id for job in jobs)
        else:
            jobs = _run_locally(cfg, folder, stage, devices)
        submission.stages[name] = [job.job_id for job in jobs]
    return submission


def local_slots(cfg: Config, devices: list[int] | None) -> int:
    """How many local jobs run at once: one per GPU given, else the CPUs each job asks for, over the machine's."""
    if devices:
        return len(devices)
    return max(1, (os.cpu_count() or 1) // cfg.cluster.cpus_per_task)


def _run_locally(
    cfg: Config, folder: Path, stage: Stage, devices: list[int] | None
) -> list[submitit.Job[Any]]:
    """Run a stage on the local or debug executor and wait for it; a failed job stops here, naming its log."""
    slots = 1 if cfg.cluster.executor == "debug" else min(local_slots(cfg, devices), len(stage.calls))
    jobs = []
    for slot in range(slots):
        if devices:
            executor = make_executor(cfg.cluster, folder, replace(stage.shape, gpus_per_node=1), (devices[slot],))
        else:
            executor = make_executor(cfg.cluster, folder, stage.shape)
        jobs.append(executor.submit(JobSequence(), stage.calls[slot::slots]))
    for job in jobs:
        try:
            job.result()
        except submitit.core.utils.FailedJobError as err:
            last = [line for line in str(err).splitlines() if line.strip()][-1:] or ["(no output)"]
            raise JobFailedError(f"{stage.shape.name} job {job.job_id} failed: {last[0].strip()} (its log: "
                                 f"{job.paths.stderr})") from err  # fmt: skip
    return jobs


def parse_devices(option: str) -> list[int] | None:
    """The GPU indices of a `--devices 0,1,2,3` option (None when empty), each once: a name CUDA cannot parse or a GPU
    listed twice would put two jobs on one GPU."""
    devices = [d for d in option.split(",") if d]
    if not devices:
        return None
    if not all(d.isdigit() for d in devices) or len(set(devices)) != len(devices):
        raise ConfigError(f"--devices {option}: expected distinct GPU indices such as 0,1,2,3")
    return [int(d) for d in devices]
