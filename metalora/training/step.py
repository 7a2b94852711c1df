"""One meta-step, in the order it happens: episodes -> their batches -> meta-gradients (forward and backward,
`episode_gradients`) -> one flattened reduce -> finite check -> clip -> optimizer step -> schedule
(`apply_meta_gradient`).

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

from metalora.data.episode_batches import episode_batches
from metalora.data.episodes import Episode
from metalora.method.batched import task_batched_gradients, tasks_line_up
from metalora.method.meta import meta_gradients
from metalora.method.task_stats import TaskStats
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


def episode_gradients(
    parts: TrainingParts, episodes: list[Episode], total_tasks: int
) -> tuple[list[torch.Tensor], list[TaskStats]]:
    """The meta-gradient share of `episodes` (see `meta_gradients`): their batches made on the data side, then all
    tasks adapted at once where `speed.task_batched` asks and their batches line up, else one task at a time."""
    cfg = parts.cfg
    batches = episode_batches(episodes, parts.tasks, parts.encoder, cfg.meta, cfg.speed)
    together = cfg.speed.task_batched and tasks_line_up(batches)
    gradients = task_batched_gradients if together else meta_gradients
    return gradients(parts.model, parts.shared, batches, cfg.meta, total_tasks)


def training_step(parts: TrainingParts, step: int, accelerator: Accelerator) -> StepResult:
    """Take meta-step `step` on `parts`: this process adapts its tasks of the meta-batch, the gradients of all
    processes are summed, and every process applies the same update to its copy of the shared weights."""
    episodes = parts.sampler.sample(step, accelerator.process_index, accelerator.num_processes)
    # Forward and backward: this process's share of the mean meta-gradient over the whole meta-batch.
    with accelerator.autocast():
        grads, stats = episode_gradients(parts, episodes, total_tasks=parts.cfg.meta.meta_batch_size)
    return apply_meta_gradient(parts, grads, stats, accelerator)


def apply_meta_gradient(
    parts: TrainingParts, grads: list[torch.Tensor], stats: list[TaskStats], accelerator: Accelerator
) -> StepResult:
    """Sum this process's meta-gradient share `grads` (in `parts.shared` order) with the other processes', skip the
    step if anything is not finite, clip, and step the meta-optimizer and its schedule."""
    shared, world = parts.shared, accelerator.num_processes
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
    bound = parts.cfg.meta.max_grad_norm if parts.cfg.meta.max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(list(shared.values()), bound)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return StepResult(stats, float(norm), lr)
