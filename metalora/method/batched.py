"""Task-batched first-order MeTA-LoRA: all tasks of a meta-batch adapted in one forward/backward.

`torch.func.vmap` maps one task's loss over a leading task dimension. The frozen base weights carry
no task dimension, so each of their matmuls runs once over every task's rows; the LoRA weights carry
it, so theirs become batched matmuls (one small matrix pair per task). Plain autograd then
differentiates the sum of the tasks' losses: a task's weights reach only its own loss, so that one
backward pass gives every task its own gradient. (`torch.func.grad` inside the vmap gives the same
gradients at a much higher peak memory: it keeps every task's graph per inner step.) The
inner optimizer is the same elementwise update as `adapt`, applied to the stacked weights.

vmap cannot follow data-dependent Python branches, so everything shape-like is decided outside it:
the batches of all tasks are left-padded to one width, the causal-and-padding attention mask is
built here as a 4-D boolean mask (the model uses a 4-D mask as given), and the target window is
the widest of the tasks'. Tasks whose batches do not line up (different numbers of batches or
rows) are not batchable; `tasks_line_up` says so, and the caller then uses the per-task loop
(`metalora.method.meta.meta_gradients`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.func import vmap

from metalora.config import MetaConfig
from metalora.method.adapt import Moments, Params, inner_update
from metalora.method.batch import IGNORE_INDEX, Batch, EpisodeBatches
from metalora.method.loss import count_target_tokens, target_window, window_logits
from metalora.method.meta import seeded
from metalora.method.task_stats import TaskStats, forwarded_tokens, task_stats
from metalora.speed.dropout_masks import torch_dropout_masks

PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "position_ids": 0, "labels": IGNORE_INDEX}


def tasks_line_up(episodes: list[EpisodeBatches]) -> bool:
    """True when the tasks can be stacked: every support step is one whole batch, every task has as many support
    and query batches, and batch i has as many rows in every task."""
    if any(len(step) != 1 for e in episodes for step in e.support):
        return False
    shapes = [([len(s[0]["input_ids"]) for s in e.support], [len(b["input_ids"]) for b in e.query]) for e in episodes]
    return all(shape == shapes[0] for shape in shapes)


def stack_batches(batches: list[Batch]) -> tuple[Batch, int]:
    """Stack one batch per task into [tasks, rows, width] tensors, left-padded to a common width.

    Args:
        batches: one collated batch per task, all with the same number of rows.

    Returns:
        (the stacked batch with a 4-D `attention_mask` [tasks, rows, 1, width, width] that is True
        where a position may attend, T = the widest target window of the tasks).
    """
    width = max(b["input_ids"].shape[1] for b in batches)
    stacked = {
        key: torch.stack([F.pad(b[key], (width - b[key].shape[1], 0), value=fill) for b in batches])
        for key, fill in PAD_VALUES.items()
    }
    device = stacked["input_ids"].device
    real_keys = stacked["attention_mask"].bool()[:, :, None, :]
    # A padding query sees itself, so no row of the mask is empty (an all-masked softmax row is NaN).
    itself = torch.eye(width, dtype=torch.bool, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    stacked["attention_mask"] = (causal & (real_keys | itself))[:, :, None]
    window = target_window(stacked["labels"])
    return stacked, window


def _task_loss(model: torch.nn.Module, window: int):
    """One task's mean target cross-entropy as a function vmap can map (no data-dependent branches)."""

    def loss(params: Params, batch: Batch, weight: torch.Tensor) -> torch.Tensor:
        logits, labels = window_logits(model, params, batch, window)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        return ce * weight

    return loss


def batched_loss_and_grad(
    model: torch.nn.Module, params: Params, batches: list[Batch], weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, Params]:
    """Per-task loss of one batch per task and its gradient with respect to the stacked `params`.

    Args:
        model: the model (LoRA attached).
        params: weights by name with a leading task dimension.
        batches: one batch per task (equal rows).
        weights: a per-task factor on the loss (default 1).

    Returns:
        (losses [tasks], gradients by name [tasks, ...]).
    """
    stacked, window = stack_batches(batches)
    if weights is None:
        weights = torch.ones(len(batches), device=stacked["input_ids"].device)
    leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
    # Only torch's generator gives vmap different dropout masks per task.
    with warnings.catch_warnings(), torch_dropout_masks():
        # Attention has no vmap rule on some backends and runs per task: known, and a small share.
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        losses = vmap(_task_loss(model, window), randomness="different")(leaves, stacked, weights)
    grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
    return losses.detach(), dict(zip(leaves, grads, strict=True))


@torch.no_grad()
def batched_loss(model: torch.nn.Module, params: Params, batches: list[Batch]) -> torch.Tensor:
    """Per-task mean target cross-entropy of one batch per task under stacked `params` (no graph)."""
    stacked, window = stack_batches(batches)
    weights = torch.ones(len(batches), device=stacked["input_ids"].device)
    with warnings.catch_warnings(), torch_dropout_masks():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        return vmap(_task_loss(model, window), randomness="different")(params, stacked, weights)


def adapt_batched(
    model: torch.nn.Module, shared: Params, support: list[list[Batch]], steps: int, lr: float, optimizer: str
) -> tuple[Params, list[list[float]]]:
    """First-order inner loop of every task at once, from the same shared weights.

    Args:
        model: the model (LoRA attached).
        shared: the shared LoRA weights by name (not modified).
        support: per task, its support batches; step i uses batch i % len of each task's list.
        optimizer: "sgd" or "adam", the same update rules as `adapt`.

    Returns:
        (adapted weights by name with a leading task dimension, per task the loss before each step).
    """
    tasks = len(support)
    current = {name: value.detach().expand(tasks, *value.shape).clone() for name, value in shared.items()}
    names = list(current)
    moments: Moments | None = None
    losses: list[list[float]] = [[] for _ in range(tasks)]
    for step in range(steps):
        step_losses, grads = batched_loss_and_grad(model, current, [s[step % len(s)] for s in support])
        for task, value in enumerate(step_losses.tolist()):
            losses[task].append(value)
        values, moments = inner_update(
            list(current.values()), [grads[n] for n in names], moments, step + 1, lr, optimizer, smooth=False
        )
        current = dict(zip(names, values, strict=True))
    return current, losses


def task_batched_gradients(
    model: torch.nn.Module, shared: Params, episodes: list[EpisodeBatches], cfg: MetaConfig, total_tasks: int
) -> tuple[list[torch.Tensor], list[TaskStats]]:
    """First-order MeTA-LoRA's share of the meta-gradient (as `meta_gradients` returns it) with every task of
    `episodes` adapted at once; the tasks must line up (`tasks_line_up`)."""
    support = [[step[0] for step in e.support] for e in episodes]
    query = [e.query for e in episodes]
    device = next(iter(shared.values())).device
    target_tokens = torch.tensor([[count_target_tokens(b) for b in q] for q in query], dtype=torch.float32)
    shares = (target_tokens / target_tokens.sum(-1, keepdim=True)).to(device)
    # One seed per meta-batch: the tasks' dropout masks are drawn together.
    with seeded(episodes[0].seed):
        adapted, inner = adapt_batched(model, shared, support, cfg.inner_steps, cfg.inner_lr, cfg.inner_optimizer)
        query_losses = torch.zeros(len(episodes), device=device)
        summed = {name: torch.zeros_like(value) for name, value in adapted.items()}
        for j in range(len(query[0])):
            losses, grads = batched_loss_and_grad(model, adapted, [q[j] for q in query], shares[:, j])
            query_losses += losses.detach()
            for name, grad in grads.items():
                summed[name].add_(grad)
        support_after: list[float | None] = [None] * len(episodes)
        if cfg.measure_gap:
            support_after = batched_loss(model, adapted, [s[0] for s in support]).tolist()
    stats = [
        task_stats(e.task, inner[t], support_after[t], float(query_losses[t]),
                   forwarded_tokens(e.support, e.query, cfg.inner_steps, cfg.measure_gap))
        for t, e in enumerate(episodes)
    ]  # fmt: skip
    return [summed[name].sum(0) / total_tasks for name in shared], stats
