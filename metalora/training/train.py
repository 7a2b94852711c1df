"""Headless meta-training: `accelerate launch -m metalora.training.train params/base.yaml [more.yaml] [a.b=value ...]`.

The same entry point runs as `python -m metalora.training.train` and `metalora train`. A run reads in three
parts: `prepare_run` (resume policy, parts, run records, trackers), `run_loop` (each step of `training/step.py`,
its log line, checkpoints) and `finish_run` (final weights, summary). Order follows the accelerate examples:
Accelerator -> seed -> data -> model -> optimizer -> loop. The frozen base is not
wrapped in DDP (function transforms and DDP hooks do not mix): each process adapts its own tasks of
the meta-batch and the meta-gradients are summed explicitly with `accelerator.reduce`, so every
process holds the same shared weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from metalora.config import Config, ConfigError, load_config, save_config, split_args
from metalora.data.splits import save_splits
from metalora.errors import MetaloraError, exit_status
from metalora.io import atomic_directory, atomic_write_json, atomic_write_text, write_checksums
from metalora.modeling.lora import save_adapter
from metalora.modeling.models import count_parameters, pick_device
from metalora.training.budgets import example_gradients, multitask_plan, planned_steps
from metalora.training.checkpoints import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from metalora.training.parts import TrainingParts, build_parts, position_scheduler
from metalora.training.rundir import locked, record_resume, refuse_used, resume_changes
from metalora.training.step import StepResult, losses_finite, training_step
from metalora.training.tracker_runs import record_trackers, reopen_kwargs

LOGGER = logging.getLogger("metalora")


class TrainingDivergedError(MetaloraError):
    """A loss became NaN or infinite; the last good state was saved first."""


class TrainingStopped(MetaloraError):
    """Training stopped between two steps because it was asked to (a job near its time limit); the state after the
    last step is checkpointed, and a resume continues from it."""


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, or this process's own peak resident set size on CPU.

    On Linux the peak is read from /proc (VmHWM), which belongs to this process's address space and starts
    afresh at exec; `ru_maxrss` would carry a parent's peak over into a child it started.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, the fallback elsewhere


def step_metrics(step: int, result: StepResult, seconds: float, device: torch.device) -> dict[str, float]:
    """Flatten one meta-step's result into the logged metrics."""
    metrics: dict[str, float] = {"step": step, "stage2/lr": result.lr}
    if result.grad_norm is not None:
        metrics["stage2/grad_norm"] = result.grad_norm
    stats = result.tasks
    for s in stats:
        if s.first_inner_loss is not None:
            metrics[f"stage1/{s.task}/loss_first"] = s.first_inner_loss
            metrics[f"stage1/{s.task}/loss_last"] = s.last_inner_loss
    metrics["stage2/meta_loss"] = sum(s.query_loss for s in stats) / len(stats)
    gaps = [s.adaptation_gap for s in stats]
    if None not in gaps:
        metrics["adaptation_gap"] = sum(gaps) / len(gaps)
    metrics["system/time_per_step_s"] = seconds
    metrics["system/tokens_per_s"] = sum(s.tokens for s in stats) / seconds
    metrics["system/peak_memory_mb"] = peak_memory_mb(device)
    return metrics


def base_parameter_count(parts: TrainingParts) -> int:
    """Parameters of the frozen base model alone (the LoRA weights are not part of it; FOMAML has none)."""
    total = count_parameters(parts.model)["total"]
    if parts.cfg.meta.algorithm == "fomaml":
        return total
    return total - sum(t.numel() for t in parts.shared.values())


def tracker_config(cfg: Config) -> dict[str, object]:
    """The resolved config as flat `group.key` hyperparameters; lists and mappings become strings, since
    trackers such as TensorBoard accept only scalars."""
    flat = OmegaConf.to_container(OmegaConf.structured(cfg))
    hparams: dict[str, object] = {}
    for group, values in flat.items():
        for key, value in values.items():
            scalar = isinstance(value, bool | int | float | str)
            hparams[f"{group}.{key}"] = value if scalar else json.dumps(value)
    return hparams


def _truncate_metrics(path: Path, start: int) -> None:
    """Drop lines logged after the checkpoint a run resumes from (they will be logged again), and a line torn
    by a crash mid-write."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            if json.loads(line)["step"] < start:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            LOGGER.warning("%s: skipped an unreadable line (torn by an interrupted write): %.60s", path, line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def warn_long_targets(parts: TrainingParts) -> None:
    """Log, per task, how many targets `data.max_target_tokens` cuts (exact match cannot reach them)."""
    limit = parts.cfg.data.max_target_tokens
    for name, pools in parts.splits.train.items():
        lengths = [len(parts.encoder.tokenizer(" " + e.target, add_special_tokens=False)["input_ids"])
                   for e in pools.support + pools.query]  # fmt: skip
        cut = [n for n in lengths if n > limit]
        if cut:
            LOGGER.warning(
                "task '%s': %d of %d targets are longer than data.max_target_tokens=%d (longest %d tokens) and are "
                "cut; raise it, or expect exact match to miss them", name, len(cut), len(lengths), limit, max(cut),
            )  # fmt: skip


def _export_final(parts: TrainingParts, run_dir: Path) -> Path:
    if parts.cfg.meta.algorithm == "fomaml":
        target = run_dir / "model"
        with atomic_directory(target) as tmp:
            parts.model.save_pretrained(tmp)
            write_checksums(tmp)  # verified before an evaluation loads it, as adapters and checkpoints are
        return target
    return save_adapter(parts.model, run_dir / "adapter")


def train(cfg: Config, resume: bool = False, stop: Callable[[], bool] | None = None) -> Path:
    """Run meta-training as configured; returns the run directory.

    Args:
        resume: continue from the latest checkpoint (also `train.resume=true`).
        stop: asked after every step; once it says True in any process, every process checkpoints that step and
            raises TrainingStopped (a job near its time limit, see `metalora/jobs/work.py`).

    Returns:
        The run directory, holding config.yaml, splits.json, metrics.jsonl, summary.json,
        checkpoints/ and the final adapter (or model/ for fomaml).

    Raises:
        CheckpointError: resume without a checkpoint, a corrupt checkpoint, or a fresh run into a
            directory that already holds checkpoints.
        TrainingDivergedError: a NaN/inf loss (after saving the last good state).
        TrainingStopped: `stop` said so (after saving the state).
    """
    resume = resume or cfg.train.resume
    run_dir = cfg.run_dir
    log_with = list(cfg.train.log_with) or None
    pick_device(cfg.train.cpu)  # refuses a GPU that CUDA cannot use rather than training on the CPU unasked
    accelerator = Accelerator(
        cpu=cfg.train.cpu,
        mixed_precision=cfg.train.mixed_precision or None,
        log_with=log_with,
        project_dir=str(run_dir),
    )
    check_distributed(cfg, accelerator)
    with ExitStack() as stack:
        if accelerator.is_main_process:
            stack.enter_context(locked(run_dir))
        run = prepare_run(cfg, resume, accelerator, log_with)
        if run.finished:
            accelerator.print(f"{run.run_dir} already finished its {run.total_steps} steps: nothing to do, nothing "
                              "rewritten")  # fmt: skip
            return run.run_dir
        run_loop(run, accelerator, stop)
        finish_run(run, accelerator)
        return run.run_dir


# What `accelerate launch` may ask for that the kit honours: it splits a meta-batch's tasks over processes and
# reduces their gradients itself, and sharded or pipelined engines would wrap the model it calls functionally.
SUPPORTED_DISTRIBUTED = {"NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA"}


def check_distributed(cfg: Config, accelerator: Accelerator) -> None:
    """Refuse a distributed engine the kit does not honour, and a meta-batch that leaves processes idle."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind.upper() not in SUPPORTED_DISTRIBUTED:
        raise ConfigError(
            f"accelerate's distributed type {kind} is not supported: the kit reduces the LoRA meta-gradients itself "
            "and keeps the frozen base unwrapped; use a multi-GPU (DDP-style) accelerate config"
        )
    if cfg.meta.meta_batch_size < accelerator.num_processes:
        raise ConfigError(
            f"meta.meta_batch_size={cfg.meta.meta_batch_size} is smaller than the {accelerator.num_processes} "
            "processes: each process adapts its own tasks of a meta-batch, so some would stay idle; raise "
            "meta.meta_batch_size to at least the number of processes"
        )


@dataclass
class PreparedRun:
    """A run ready for its loop: its parts (restored from the latest checkpoint on resume) and its steps."""

    parts: TrainingParts
    run_dir: Path
    start: int
    total_steps: int

    @property
    def finished(self) -> bool:
        """Whether the run already ran to its planned end and wrote its final files."""
        return self.start == self.total_steps and (self.run_dir / "summary.json").is_file()

    @property
    def metrics_path(self) -> Path:
        """The run's metrics log, one JSON line per meta-step."""
        return self.run_dir / "metrics.jsonl"

    def save_checkpoint(self, step: int) -> None:
        """Checkpoint the shared weights and the meta-optimizer after `step` meta-steps (main process only)."""
        cfg = self.parts.cfg
        save_checkpoint(self.run_dir, step, self.parts.model, self.parts.optimizer, cfg.meta.algorithm, cfg.train.seed)
        prune_checkpoints(self.run_dir, cfg.train.keep_checkpoints)


def prepare_run(cfg: Config, resume: bool, accelerator: Accelerator, log_with: list[str] | None) -> PreparedRun:
    """Apply the resume policy, build the parts (restored from the latest checkpoint on resume), write the
    run's config and splits, cut the metrics log back to the checkpoint, and start the trackers."""
    run_dir = cfg.run_dir
    set_seed(cfg.train.seed)
    checkpoint = latest_checkpoint(run_dir)
    if resume and checkpoint is None:
        raise CheckpointError(
            f"{run_dir}: resume asked for, but there is no checkpoint under checkpoints/ (a run stopped before its "
            "first checkpoint leaves nothing to resume: to start over, remove the directory and run without --resume)"
        )
    if not resume:
        refuse_used(run_dir)
    changed = resume_changes(run_dir, cfg) if resume else {}
    # The first process converts the embedded model and builds the data; the others then read the cache.
    with accelerator.main_process_first():
        parts = build_parts(cfg, accelerator.device)
    start = 0
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, parts.model, parts.optimizer, cfg.meta.algorithm, cfg.train.seed)
        position_scheduler(parts, start)
    run = PreparedRun(parts, run_dir, start, planned_steps(cfg))
    # History is never rewritten: a checkpoint past the planned end would be saved again under an earlier step's
    # name, and a finished run's files stay as they were written.
    if start > run.total_steps:
        raise CheckpointError(
            f"{run_dir}: its latest checkpoint is at step {start}, but this config plans {run.total_steps} steps: "
            f"resume with train.steps >= {start}, or train another run (train.run_name)"
        )
    if run.finished:
        return run
    if accelerator.is_main_process:
        if changed:
            record_resume(run_dir, start, changed)
            accelerator.print(f"resuming at step {start} with changed settings: {changed}")
        warn_long_targets(parts)
        save_config(cfg, run_dir)
        save_splits(parts.splits, run_dir)
        _truncate_metrics(run.metrics_path, start)
    if log_with:
        # A resumed run, and later its evaluation, log to the tracker runs it started with.
        accelerator.init_trackers(cfg.train.run_name, config=tracker_config(cfg), init_kwargs=reopen_kwargs(run_dir))
        if accelerator.is_main_process:
            record_trackers(run_dir, accelerator.trackers)
    return run


def run_loop(run: PreparedRun, accelerator: Accelerator, stop: Callable[[], bool] | None = None) -> None:
    """The meta-training loop: each step (`training_step`), its metrics line, and a checkpoint when one is due.

    Raises:
        TrainingDivergedError: a loss or the meta-gradient was not finite (the state before that step is saved).
        TrainingStopped: `stop` said so after a step (the state after that step is saved).
    """
    cfg = run.parts.cfg
    bar = tqdm(range(run.start, run.total_steps), disable=not accelerator.is_main_process, desc=cfg.meta.algorithm)
    for step in bar:
        began = time.perf_counter()
        result = training_step(run.parts, step, accelerator)
        if not result.stepped:
            if accelerator.is_main_process:
                run.save_checkpoint(step)
            bad = sorted({s.task for s in result.tasks if not losses_finite(s)})
            raise TrainingDivergedError(
                f"non-finite {'loss' if bad else 'meta-gradient'} at step {step}{f' (tasks {bad})' if bad else ''}; "
                f"the state after {step} steps is saved in {run.run_dir}/checkpoints/step_{step}. "
                "Lower meta.inner_lr or meta.meta_lr."
            )
        metrics = step_metrics(step, result, time.perf_counter() - began, accelerator.device)
        if accelerator.is_main_process:
            with run.metrics_path.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
            bar.set_postfix(meta_loss=f"{metrics['stage2/meta_loss']:.4f}")
        accelerator.log(metrics, step=step)
        done = step + 1
        due = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0
        if due and accelerator.is_main_process:
            run.save_checkpoint(done)
        if stop is not None and stop_agreed(stop(), accelerator):
            if not due and accelerator.is_main_process:
                run.save_checkpoint(done)
            accelerator.wait_for_everyone()
            raise TrainingStopped(f"{run.run_dir}: stopped as asked after step {done} of {run.total_steps}; the state "
                                  f"is checkpointed in checkpoints/step_{done}, and a resume continues from it")
    accelerator.wait_for_everyone()


def stop_agreed(asked: bool, accelerator: Accelerator) -> bool:
    """Whether any process was asked to stop: a signal reaches processes at different moments, and a process that
    stopped alone would leave the others waiting in the next step's reduce."""
    if accelerator.num_processes == 1:
        return asked
    votes = accelerator.reduce(torch.tensor([float(asked)], device=accelerator.device), reduction="sum")
    return bool(votes.item() > 0)


def finish_run(run: PreparedRun, accelerator: Accelerator) -> None:
    """Checkpoint the last step when the cadence did not, export the final weights and write summary.json."""
    cfg, parts = run.parts.cfg, run.parts
    if accelerator.is_main_process:
        if not (run.run_dir / "checkpoints" / f"step_{run.total_steps}").is_dir():
            run.save_checkpoint(run.total_steps)
        exported = _export_final(parts, run.run_dir)
        atomic_write_json(
            run.run_dir / "summary.json",
            {
                "algorithm": cfg.meta.algorithm,
                "steps": run.total_steps,
                "example_gradients": example_gradients(cfg),
                "processes": accelerator.num_processes,
                "device": str(accelerator.device),
                "trainable_parameters": sum(t.numel() for t in parts.shared.values()),
                "base_parameters": base_parameter_count(parts),
                "final_weights": str(exported.relative_to(run.run_dir)),
                "final_weights_bytes": sum(f.stat().st_size for f in exported.rglob("*") if f.is_file()),
                **({"budget": multitask_plan(cfg).budget} if cfg.meta.algorithm == "multitask" else {}),
            },
        )
    accelerator.end_training()


def main(argv: list[str] | None = None) -> int:
    """Parse `[params.yaml ...] [a.b=value ...] [--resume]` and train.

    Args:
        argv: arguments (default: sys.argv[1:]).

    Returns:
        The process exit status (2 for bad input).
    """
    parser = argparse.ArgumentParser(prog="metalora train", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="*", help="YAML parameter files, then a.b=value overrides")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args(argv)
    files, overrides = split_args(args.config)

    def run() -> int:
        print(f"run directory: {train(load_config(files, overrides), resume=args.resume)}")
        return 0

    return exit_status("metalora train", run)


if __name__ == "__main__":
    sys.exit(main())
