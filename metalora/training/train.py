"""Headless meta-training: `accelerate launch -m metalora.training.train params/base.yaml [more.yaml] [a.b=value ...]`.

The same entry point runs as `python -m metalora.training.train` and `metalora train`. Loop order follows the
accelerate examples: Accelerator -> seed -> data -> model -> optimizer -> loop. The frozen base is not
wrapped in DDP (function transforms and DDP hooks do not mix): each process adapts its own tasks of
the meta-batch and the meta-gradients are summed explicitly with `accelerator.reduce`, so every
process holds the same shared weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from metalora.config import Config, ConfigError, load_config, save_config, split_args
from metalora.data.collation import Encoder
from metalora.data.episodes import EpisodeSampler
from metalora.data.splits import Experiment, build_experiment, save_splits
from metalora.errors import MetaloraError, exit_status
from metalora.io import atomic_write_json, atomic_write_text
from metalora.method.meta import TaskStats, meta_step
from metalora.modeling.lora import attach_lora, lora_params, save_adapter
from metalora.modeling.models import count_parameters, load_model, pick_device
from metalora.speed.activation_checkpointing import checkpoint_decoder_layers
from metalora.speed.compiled_layers import compile_decoder_layers
from metalora.training.budgets import example_gradients, multitask_plan, planned_steps
from metalora.training.checkpoints import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from metalora.training.rundir import locked, record_resume, refuse_used, resume_changes

LOGGER = logging.getLogger("metalora")


class TrainingDivergedError(MetaloraError):
    """A loss became NaN or infinite; the last good state was saved first."""


@dataclass
class Trainer:
    """Everything a meta-training loop needs, built once (also usable step by step from a notebook)."""

    cfg: Config
    model: torch.nn.Module
    encoder: Encoder
    experiment: Experiment
    shared: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    sampler: EpisodeSampler


def build_trainer(cfg: Config, device: torch.device | str = "cpu") -> Trainer:
    """Load data and model, attach LoRA (unless fomaml) and create the meta-optimizer.

    Returns:
        The trainer's parts.
    """
    experiment = build_experiment(cfg.data, cfg.eval.scenario)
    model, tokenizer = load_model(
        cfg.model, force_cpu=torch.device(device).type != "cuda", weight_first_logits=cfg.speed.weight_first_logits
    )
    model.to(device)
    if not cfg.meta.first_order and cfg.meta.algorithm == "metalora":
        # Second order needs a double backward, which fused SDPA attention kernels do not implement.
        model.set_attn_implementation("eager")
    if cfg.meta.algorithm == "fomaml":
        shared = dict(model.named_parameters())
    else:
        model = attach_lora(model, cfg.lora, seed=cfg.train.seed, cpu_dropout_masks=cfg.speed.cpu_dropout_masks)
        shared = lora_params(model)
    model.train()  # LoRA dropout is part of the inner loop
    if cfg.speed.activation_checkpointing:
        checkpoint_decoder_layers(model)
    if cfg.speed.compile_layers:
        compile_decoder_layers(model)
    if cfg.meta.algorithm == "reptile":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(shared.values(), **optimizer_settings(cfg))
    else:
        optimizer = torch.optim.AdamW(shared.values(), **optimizer_settings(cfg))
    encoder = Encoder(
        tokenizer,
        cfg.data.prompt_template,
        cfg.data.use_instruction,
        cfg.data.max_prompt_tokens,
        cfg.data.max_target_tokens,
        device=device,
        chat_template=cfg.data.chat_template,
    )
    sampler = EpisodeSampler(
        experiment.train, cfg.meta.n_support, cfg.meta.n_query, cfg.meta.meta_batch_size, cfg.train.seed
    )
    return Trainer(cfg, model, encoder, experiment, shared, optimizer, sampler)


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


def step_metrics(
    step: int, stats: list[TaskStats], seconds: float, device: torch.device, grad_norm: float | None = None
) -> dict[str, float]:
    """Flatten one meta-step's task statistics into the logged metrics."""
    metrics: dict[str, float] = {"step": step}
    if grad_norm is not None:
        metrics["stage2/grad_norm"] = grad_norm
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


def base_parameter_count(trainer: Trainer) -> int:
    """Parameters of the frozen base model alone (the LoRA weights are not part of it; FOMAML has none)."""
    total = count_parameters(trainer.model)["total"]
    if trainer.cfg.meta.algorithm == "fomaml":
        return total
    return total - sum(t.numel() for t in trainer.shared.values())


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


def _losses_finite(stats: TaskStats) -> bool:
    return all(math.isfinite(v) for v in (stats.query_loss, stats.last_inner_loss) if v is not None)


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


def optimizer_settings(cfg: Config) -> dict[str, float]:
    """The meta-optimizer's hyperparameters for `cfg` (what a resumed run applies over the restored ones)."""
    if cfg.meta.algorithm == "reptile":
        return {"lr": cfg.meta.reptile_step_size}
    lr = cfg.baseline.multitask_lr if cfg.meta.algorithm == "multitask" else cfg.meta.meta_lr
    return {"lr": lr, "weight_decay": cfg.meta.weight_decay}


def apply_optimizer_settings(trainer: Trainer) -> None:
    """Set the configured learning rate and weight decay on every parameter group (a checkpoint restores the
    values it was saved with)."""
    for group in trainer.optimizer.param_groups:
        group.update(optimizer_settings(trainer.cfg))


def warn_long_targets(trainer: Trainer) -> None:
    """Log, per task, how many targets `data.max_target_tokens` cuts (exact match cannot reach them)."""
    limit = trainer.cfg.data.max_target_tokens
    for name, pools in trainer.experiment.train.items():
        lengths = [len(trainer.encoder.tokenizer(" " + e.target, add_special_tokens=False)["input_ids"])
                   for e in pools.support + pools.query]  # fmt: skip
        cut = [n for n in lengths if n > limit]
        if cut:
            LOGGER.warning(
                "task '%s': %d of %d targets are longer than data.max_target_tokens=%d (longest %d tokens) and are "
                "cut; raise it, or expect exact match to miss them", name, len(cut), len(lengths), limit, max(cut),
            )  # fmt: skip


def _export_final(trainer: Trainer, run_dir: Path) -> Path:
    if trainer.cfg.meta.algorithm == "fomaml":
        target = run_dir / "model"
        trainer.model.save_pretrained(target)
        return target
    return save_adapter(trainer.model, run_dir / "adapter")


def train(cfg: Config, resume: bool = False) -> Path:
    """Run meta-training as configured; returns the run directory.

    Args:
        resume: continue from the latest checkpoint (also `train.resume=true`).

    Returns:
        The run directory, holding config.yaml, splits.json, metrics.jsonl, summary.json,
        checkpoints/ and the final adapter (or model/ for fomaml).

    Raises:
        CheckpointError: resume without a checkpoint, a corrupt checkpoint, or a fresh run into a
            directory that already holds checkpoints.
        TrainingDivergedError: a NaN/inf loss (after saving the last good state).
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
        return _train_locked(cfg, resume, accelerator, log_with)


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


def _train_locked(cfg: Config, resume: bool, accelerator: Accelerator, log_with: list[str] | None) -> Path:
    run_dir = cfg.run_dir
    set_seed(cfg.train.seed)
    checkpoint = latest_checkpoint(run_dir)
    if resume and checkpoint is None:
        raise CheckpointError(f"{run_dir}: resume asked for, but there is no checkpoint under checkpoints/")
    if not resume:
        refuse_used(run_dir)
    changed = resume_changes(run_dir, cfg) if resume else {}
    # The first process converts the embedded model and builds the data; the others then read the cache.
    with accelerator.main_process_first():
        trainer = build_trainer(cfg, accelerator.device)
    start = 0
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, trainer.model, trainer.optimizer, cfg.meta.algorithm, cfg.train.seed)
        apply_optimizer_settings(trainer)
    metrics_path = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        if changed:
            record_resume(run_dir, start, changed)
            accelerator.print(f"resuming at step {start} with changed settings: {changed}")
        warn_long_targets(trainer)
        save_config(cfg, run_dir)
        save_splits(trainer.experiment, run_dir)
        _truncate_metrics(metrics_path, start)
    if log_with:
        accelerator.init_trackers(cfg.train.run_name, config=tracker_config(cfg))

    tasks = {name: pool.task for name, pool in trainer.experiment.train.items()}
    world, rank = accelerator.num_processes, accelerator.process_index

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t, reduction="sum") if world > 1 else t

    def all_finite(stats: list[TaskStats]) -> bool:
        local = all(_losses_finite(s) for s in stats)
        bad = reduce(torch.tensor(0.0 if local else 1.0, device=accelerator.device))
        return float(bad) == 0.0

    total_steps = planned_steps(cfg)
    bar = tqdm(range(start, total_steps), disable=not accelerator.is_main_process, desc=cfg.meta.algorithm)
    last_saved = start
    for step in bar:
        began = time.perf_counter()
        episodes = trainer.sampler.sample(step, rank, world)
        with accelerator.autocast():
            result = meta_step(
                trainer.model, trainer.shared, episodes, tasks, trainer.encoder, cfg.meta, trainer.optimizer,
                total_tasks=cfg.meta.meta_batch_size, reduce=reduce, can_step=all_finite, speed=cfg.speed,
            )  # fmt: skip
        stats = result.tasks
        all_stats = gather_object(stats) if world > 1 else stats
        if not all(_losses_finite(s) for s in all_stats):
            if accelerator.is_main_process:
                save_checkpoint(run_dir, step, trainer.model, trainer.optimizer, cfg.meta.algorithm, cfg.train.seed)
            bad = sorted({s.task for s in all_stats if not math.isfinite(s.query_loss)})
            raise TrainingDivergedError(
                f"non-finite loss at step {step} (tasks {bad}); the state after {step} steps is saved in "
                f"{run_dir}/checkpoints/step_{step}. Lower meta.inner_lr or meta.meta_lr."
            )
        metrics = step_metrics(step, all_stats, time.perf_counter() - began, accelerator.device, result.grad_norm)
        if accelerator.is_main_process:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
            bar.set_postfix(meta_loss=f"{metrics['stage2/meta_loss']:.4f}")
        accelerator.log(metrics, step=step)
        done = step + 1
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and accelerator.is_main_process:
            save_checkpoint(run_dir, done, trainer.model, trainer.optimizer, cfg.meta.algorithm, cfg.train.seed)
            prune_checkpoints(run_dir, cfg.train.keep_checkpoints)
            last_saved = done
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if last_saved != total_steps:
            save_checkpoint(run_dir, total_steps, trainer.model, trainer.optimizer, cfg.meta.algorithm, cfg.train.seed)
            prune_checkpoints(run_dir, cfg.train.keep_checkpoints)
        exported = _export_final(trainer, run_dir)
        atomic_write_json(
            run_dir / "summary.json",
            {
                "algorithm": cfg.meta.algorithm,
                "steps": total_steps,
                "example_gradients": example_gradients(cfg),
                "processes": world,
                "device": str(accelerator.device),
                "trainable_parameters": sum(t.numel() for t in trainer.shared.values()),
                "base_parameters": base_parameter_count(trainer),
                "final_weights": str(exported.relative_to(run_dir)),
                "final_weights_bytes": sum(f.stat().st_size for f in exported.rglob("*") if f.is_file()),
                **({"budget": multitask_plan(cfg).budget} if cfg.meta.algorithm == "multitask" else {}),
            },
        )
    accelerator.end_training()
    return run_dir


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
