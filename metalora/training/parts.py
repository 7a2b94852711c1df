"""What a meta-training run works on, built once from a config: one builder for the loop, the benchmarks and
a notebook that steps through the method by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from metalora.config import Config, ConfigError
from metalora.data.collation import Encoder
from metalora.data.episodes import EpisodeSampler
from metalora.data.splits import Splits, build_splits
from metalora.data.tasks import Task
from metalora.method.adapt import Params
from metalora.modeling.build import load_base
from metalora.modeling.lora import attach_lora, lora_params
from metalora.speed.activation_checkpointing import checkpoint_decoder_layers
from metalora.speed.compiled_layers import compile_decoder_layers
from metalora.training.budgets import planned_steps

# `meta.lr_scheduler` -> the name transformers' `get_scheduler` knows it by. A constant schedule with no
# warmup multiplies the rate by exactly 1.0, so it changes no bit of a run without a schedule.
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class TrainingParts:
    """The model with its shared weights, the data side (splits, sampler, encoder) and the meta-optimizer."""

    cfg: Config
    model: torch.nn.Module
    encoder: Encoder
    splits: Splits
    # The weights meta-learning moves, by name: the LoRA weights, or every base weight for fomaml.
    shared: Params
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    sampler: EpisodeSampler

    @property
    def tasks(self) -> dict[str, Task]:
        """The meta-training tasks by name."""
        return {name: pool.task for name, pool in self.splits.train.items()}


def build_parts(cfg: Config, device: torch.device | str = "cpu") -> TrainingParts:
    """Load data and model, attach LoRA (unless fomaml), create the meta-optimizer and its schedule.

    The schedule starts at step 0; a resumed run repositions it with `position_scheduler`.
    """
    splits = build_splits(cfg.data, cfg.eval.scenario)
    model, encoder = load_base(cfg, device)
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
    sampler = EpisodeSampler(
        splits.train, cfg.meta.n_support, cfg.meta.n_query, cfg.meta.meta_batch_size, cfg.train.seed
    )
    return TrainingParts(cfg, model, encoder, splits, shared, optimizer, build_scheduler(optimizer, cfg), sampler)


def optimizer_settings(cfg: Config) -> dict[str, float]:
    """The meta-optimizer's hyperparameters for `cfg` (what a resumed run applies over the restored ones)."""
    if cfg.meta.algorithm == "reptile":
        return {"lr": cfg.meta.reptile_step_size}
    lr = cfg.baseline.multitask_lr if cfg.meta.algorithm == "multitask" else cfg.meta.meta_lr
    return {"lr": lr, "weight_decay": cfg.meta.weight_decay}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> LambdaLR:
    """The meta-learning-rate schedule of `cfg.meta` over the run's planned steps, at step 0.

    The configured rate (`optimizer_settings`) is the peak the schedule multiplies; it is set on every
    parameter group first, so a checkpoint's stored rate never becomes the base of a resumed schedule.

    Raises:
        ConfigError: a warmup as long as the run or longer, which would keep every step below the peak rate.
    """
    steps = planned_steps(cfg)
    if 0 < steps <= cfg.meta.warmup_steps:
        raise ConfigError(f"meta.warmup_steps={cfg.meta.warmup_steps} is not shorter than this {cfg.meta.algorithm} "
                          f"run's {steps} steps: every step would train below the peak rate meta.meta_lr; shorten the "
                          "warmup or lengthen train.steps")  # fmt: skip
    for group in optimizer.param_groups:
        group.update(optimizer_settings(cfg))
        group.pop("initial_lr", None)
    return get_scheduler(
        SCHEDULES[cfg.meta.lr_scheduler],
        optimizer,
        num_warmup_steps=cfg.meta.warmup_steps,
        num_training_steps=steps,
    )


def position_scheduler(parts: TrainingParts, step: int) -> None:
    """Rebuild the schedule for a run resumed at `step`: the rate is a pure function of the step, like the
    episodes, so the step is all that resuming needs (and a changed `meta.meta_lr` takes effect)."""
    parts.scheduler = build_scheduler(parts.optimizer, parts.cfg)
    parts.scheduler.last_epoch = step
    for group, base, factor in zip(
        parts.optimizer.param_groups, parts.scheduler.base_lrs, parts.scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(step)
