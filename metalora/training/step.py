"""One meta-step, in the order it happens: episodes -> meta-gradients (forward and backward) -> one flattened
reduce -> finite check -> clip -> optimizer step -> schedule.

The method package computes the meta-gradient and nothing else; everything that touches the optimizer, the
schedule or the process group is here, where a reader sees it at once. `metalora train` runs this function
in its loop, and a notebook can call it by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from metalora.method.meta import TaskStats, meta_gradients
from metalora.training.parts import TrainingParts


@dataclass
class StepResult:
    """What one meta-step did: every process's task statistics, the gradient norm, the learning rate used."""

    tasks: list[TaskStats]
    # Global L2 norm of the reduced meta-gradient before clipping; None when the step was skipped because a
    # loss or the gradient was not finite (nothing was updated).
    grad_norm: float | None
    lr: float

    @property
    def stepped(self) -> bool:
        """Whether the shared weights were updated."""
        return self.grad_norm is not None


def losses_finite(stats: TaskStats) -> bool:
    """Whether a task's query and last inner losses are finite numbers."""
    return all(math.isfinite(v) for v in (stats.query_loss, stats.last_inner_loss) if v is not None)


def training_step(parts: TrainingParts, step: int, accelerator: Accelerator) -> StepResult:
    """Take meta-step `step` on `parts`: this process adapts its tasks of the meta-batch, the gradients of all
    processes are summed, and every process applies the same update to its copy of the shared weights."""
    cfg, shared = parts.cfg, parts.shared
    world = accelerator.num_processes
    episodes = parts.sampler.sample(step, accelerator.process_index, world)
    # Forward and backward: this process's share of the mean meta-gradient over the whole meta-batch.
    with accelerator.autocast():
        grads, stats = meta_gradients(parts.model, shared, episodes, parts.tasks, parts.encoder, cfg.meta,
                                      total_tasks=cfg.meta.meta_batch_size, speed=cfg.speed)  # fmt: skip
    # One flattened all-reduce: one collective per step instead of one per LoRA tensor.
    flat = torch.cat([g.reshape(-1) for g in grads])
    if world > 1:
        flat = accelerator.reduce(flat, reduction="sum")
        stats = gather_object(stats)
    lr = float(parts.optimizer.param_groups[0]["lr"])
    # Every process sees the same statistics and the same reduced gradient, so all skip or all step.
    if not (all(losses_finite(s) for s in stats) and bool(torch.isfinite(flat).all())):
        return StepResult(stats, None, lr)
    for tensor, grad in zip(shared.values(), flat.split([g.numel() for g in grads]), strict=True):
        tensor.grad = grad.view_as(tensor)
    # An infinite bound measures the norm without changing the gradient.
    bound = cfg.meta.max_grad_norm if cfg.meta.max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(list(shared.values()), bound)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return StepResult(stats, float(norm), lr)
