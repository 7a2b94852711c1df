"""The baselines MeTA-LoRA is compared with, and the budgets that keep the comparison fair.

- Standard LoRA is a fresh LoRA adapted on the shots (the `lora` method of the evaluation).
- Multi-task LoRA is `meta.algorithm=multitask`: the training loop of `metalora.training.train` with no inner
  loop, the loss taken on each sampled task's support and query examples together, i.e. plain
  training on the pooled examples of the meta-training tasks. Its step count is chosen so that it
  spends as many example-gradients as the meta-training run of the same config (or a set budget).
- Full-data LoRA is a fresh LoRA adapted on a held-out task's whole adaptation pool (the upper
  reference, `full_data` in the evaluation; its rows carry n_shots = FULL_DATA_SHOTS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from metalora.config import Config, MetaConfig

FULL_DATA_SHOTS = -1


def meta_example_gradients(meta: MetaConfig, steps: int) -> int:
    """Example-gradients a metalora run spends.

    Per task and meta-step: the support examples of every inner step (batch i of the support set at
    inner step i, cycling) plus the query examples of the stage-2 gradient.

    Returns:
        The total over the run.
    """
    sizes = [min(meta.inner_batch_size, meta.n_support - s) for s in range(0, meta.n_support, meta.inner_batch_size)]
    per_task = sum(sizes[i % len(sizes)] for i in range(meta.inner_steps)) + meta.n_query
    return steps * meta.meta_batch_size * per_task


@dataclass
class MultitaskPlan:
    """How long the multi-task baseline trains and why."""

    steps: int
    example_gradients: int
    budget: str


def multitask_plan(cfg: Config) -> MultitaskPlan:
    """Steps of the multi-task baseline for its example-gradient budget.

    Each step draws `meta.meta_batch_size` tasks with `meta.n_support + meta.n_query` examples each.

    Args:
        cfg: the config (its meta-training settings define the default budget).

    Returns:
        The plan; `budget` says which budget it matches.
    """
    per_step = cfg.meta.meta_batch_size * (cfg.meta.n_support + cfg.meta.n_query)
    if cfg.baseline.multitask_example_gradients:
        budget = cfg.baseline.multitask_example_gradients
        source = "baseline.multitask_example_gradients"
    else:
        budget = meta_example_gradients(cfg.meta, cfg.train.steps)
        source = (
            f"a metalora run of this config: {cfg.train.steps} meta-steps x {cfg.meta.meta_batch_size} tasks x "
            f"({cfg.meta.inner_steps} inner steps of batch {cfg.meta.inner_batch_size} + {cfg.meta.n_query} query)"
        )
    steps = max(1, math.ceil(budget / per_step))
    return MultitaskPlan(steps, steps * per_step, f"{budget} example-gradients, matching {source}")


def planned_steps(cfg: Config) -> int:
    """Optimizer steps of a training run: train.steps, or the multi-task plan's steps."""
    return multitask_plan(cfg).steps if cfg.meta.algorithm == "multitask" else cfg.train.steps


def example_gradients(cfg: Config) -> int:
    """Example-gradients a training run of `cfg` spends (recorded in its summary.json)."""
    if cfg.meta.algorithm == "multitask":
        return multitask_plan(cfg).example_gradients
    return meta_example_gradients(cfg.meta, cfg.train.steps)
