"""The meta-gradient of one meta-batch for MeTA-LoRA, FOMAML, Reptile and multi-task training.

Every algorithm turns a meta-batch into a gradient on the shared weights; the training step
(`metalora/training/step.py`) reduces it, clips it and hands it to the meta-optimizer:
- metalora / fomaml: the mean over tasks of the query-loss gradient (at the adapted weights when
  first-order; differentiated back through the inner loop otherwise). fomaml is the same code over
  all base weights instead of the LoRA weights.
- multitask: no inner loop; the gradient of the loss on the task's support and query examples
  together at the shared weights (plain multi-task training, the multi-task LoRA baseline).
- reptile: minus the mean displacement (adapted - shared), so an SGD meta-optimizer with lr =
  reptile_step_size moves the shared weights by that fraction of the mean displacement.
Each task's graph is freed before the next task starts, so memory does not grow with the meta-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metalora.config import MetaConfig, SpeedConfig
from metalora.method.adapt import Params, adapt
from metalora.method.batch import Batch, BatchMaker, EpisodeLike
from metalora.method.batched import adapt_batched, batched_loss, batched_loss_and_grad, can_batch
from metalora.method.loss import batch_loss, count_input_tokens, count_target_tokens


@dataclass
class TaskStats:
    """What one task of a meta-batch reported."""

    task: str
    # None where nothing measured them: no inner steps (multitask) and no support check.
    first_inner_loss: float | None
    last_inner_loss: float | None
    # None when `meta.measure_gap` is off.
    support_loss_after: float | None
    query_loss: float
    # Real (non-padding) tokens forwarded for this task: inner steps, query batches, support check.
    tokens: int

    @property
    def adaptation_gap(self) -> float | None:
        """Query loss minus support loss, both at the adapted weights (None when not measured)."""
        return None if self.support_loss_after is None else self.query_loss - self.support_loss_after


def query_loss_and_grad(
    model: torch.nn.Module,
    adapted: Params,
    wrt: list[torch.Tensor],
    batches: list[dict[str, torch.Tensor]],
    weight: float,
) -> tuple[float, list[torch.Tensor]]:
    """Token-weighted mean query loss over `batches` and its gradient with respect to `wrt`, times `weight`.

    Each batch is differentiated and released on its own, so only one query batch's graph is alive.
    """
    total_tokens = sum(count_target_tokens(b) for b in batches)
    grads: list[torch.Tensor] = []
    total = torch.zeros((), device=batches[0]["input_ids"].device)  # read once, after the last batch
    for index, batch in enumerate(batches):
        share = count_target_tokens(batch) / total_tokens
        loss = batch_loss(model, adapted, batch) * share
        keep = index < len(batches) - 1  # the inner-loop graph is shared by all query batches
        found = torch.autograd.grad(loss, wrt, retain_graph=keep, allow_unused=True)
        parts = [torch.zeros_like(t) if part is None else part for t, part in zip(wrt, found, strict=True)]
        # One multi-tensor call for all the (many, small) tensors instead of one call per tensor.
        if grads:
            torch._foreach_add_(grads, parts, alpha=weight)
        else:
            grads = torch._foreach_mul(parts, weight)
        total += loss.detach()
    return float(total), grads


def meta_gradients(
    model: torch.nn.Module,
    shared: Params,
    episodes: list[EpisodeLike],
    tasks: dict[str, Any],
    encoder: BatchMaker,
    cfg: MetaConfig,
    total_tasks: int,
    speed: SpeedConfig | None = None,
) -> tuple[list[torch.Tensor], list[TaskStats]]:
    """This process's share of the meta-gradient: the sum over its tasks, divided by `total_tasks`.

    Args:
        model: the model (LoRA attached for metalora/reptile).
        shared: the shared weights by name (leaf tensors that require grad).
        episodes: this process's episodes.
        total_tasks: tasks of the whole meta-batch (all processes), so that summing the processes'
            shares gives the mean over tasks.
        speed: how to compute it (task batching, packing); the defaults when None.

    Returns:
        (one gradient per shared tensor in `shared` order, per-task statistics).
    """
    speed = speed or SpeedConfig()
    if speed.task_batched:
        batched = _task_batched_gradients(model, shared, episodes, tasks, encoder, cfg, total_tasks)
        if batched is not None:
            return batched
    names = list(shared)
    grads = [torch.zeros_like(shared[n]) for n in names]
    stats = []
    second_order = cfg.algorithm == "metalora" and not cfg.first_order
    multitask = cfg.algorithm == "multitask"
    inner_steps = 0 if multitask else cfg.inner_steps
    for episode in episodes:
        task = tasks[episode.task]
        support = encoder.step_batches(task, episode.support, cfg.inner_batch_size, cfg.micro_batch_size,
                                       pack_tokens=speed.pack_tokens)  # fmt: skip
        loss_examples = episode.support + episode.query if multitask else episode.query
        query = encoder.batches(task, loss_examples, query_rows(cfg), group_by_length=True,
                                pack_tokens=speed.pack_tokens)  # fmt: skip
        # Dropout masks come from the episode's own seed, so a task's result does not depend on
        # which process adapts it or what ran before it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(episode.seed)
            adapted, inner = adapt(
                model,
                shared,
                support,
                inner_steps,
                cfg.inner_lr,
                optimizer=cfg.inner_optimizer,
                first_order=not second_order,
            )
            if cfg.algorithm == "reptile":
                with torch.no_grad():
                    q_loss = _mean_loss(model, adapted, query)
                for acc, name in zip(grads, names, strict=True):
                    acc.sub_((adapted[name].detach() - shared[name].detach()) / total_tasks)
            else:
                wrt = [shared[n] for n in names] if second_order else [adapted[n] for n in names]
                q_loss, task_grads = query_loss_and_grad(model, adapted, wrt, query, 1.0 / total_tasks)
                torch._foreach_add_(grads, task_grads)
            support_after = None
            if cfg.measure_gap:
                with torch.no_grad():
                    support_after = _mean_loss(model, adapted, support[0])
        tokens = _forwarded_tokens(support, query, inner_steps, cfg.measure_gap)
        first = inner[0] if inner else support_after
        stats.append(TaskStats(episode.task, first, inner[-1] if inner else first, support_after, q_loss, tokens))
        del adapted
    return grads, stats


def query_rows(cfg: MetaConfig) -> int:
    """Rows per query forward pass: `query_batch_size`, capped by `micro_batch_size` when that is set (the query
    loss is a token-weighted mean over all its batches, so how the rows are grouped does not change it)."""
    return min(cfg.query_batch_size, cfg.micro_batch_size or cfg.query_batch_size)


def _forwarded_tokens(
    support: list[list[Batch]] | list[Batch], query: list[Batch], inner_steps: int, gap: bool
) -> int:
    # Tokens actually forwarded: one support batch (all its micro-batches) per inner step, every query batch,
    # the support check.
    def tokens(step_batch: Batch | list[Batch]) -> int:
        return sum(count_input_tokens(b) for b in ([step_batch] if isinstance(step_batch, dict) else step_batch))

    inner_tokens = sum(tokens(support[i % len(support)]) for i in range(inner_steps))
    return inner_tokens + sum(count_input_tokens(b) for b in query) + (tokens(support[0]) if gap else 0)


def _task_batched_gradients(
    model: torch.nn.Module,
    shared: Params,
    episodes: list[EpisodeLike],
    tasks: dict[str, Any],
    encoder: BatchMaker,
    cfg: MetaConfig,
    total_tasks: int,
) -> tuple[list[torch.Tensor], list[TaskStats]] | None:
    """First-order metalora with every task of `episodes` adapted at once (None when not batchable)."""
    support = [encoder.batches(tasks[e.task], e.support, cfg.inner_batch_size) for e in episodes]
    query = [encoder.batches(tasks[e.task], e.query, query_rows(cfg), group_by_length=True) for e in episodes]
    if not (can_batch(support) and can_batch(query)):
        return None
    device = next(iter(shared.values())).device
    target_tokens = torch.tensor([[count_target_tokens(b) for b in q] for q in query], dtype=torch.float32)
    shares = (target_tokens / target_tokens.sum(-1, keepdim=True)).to(device)
    # One seed per meta-batch: the tasks' dropout masks are drawn together.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(episodes[0].seed)
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
    grads_out = [summed[name].sum(0) / total_tasks for name in shared]
    stats = []
    for t, episode in enumerate(episodes):
        first, last = (inner[t][0], inner[t][-1]) if inner[t] else (support_after[t], support_after[t])
        tokens = _forwarded_tokens(support[t], query[t], cfg.inner_steps, cfg.measure_gap)
        stats.append(TaskStats(episode.task, first, last, support_after[t], float(query_losses[t]), tokens))
    return grads_out, stats


def _mean_loss(model: torch.nn.Module, params: Params, batches: list[dict[str, torch.Tensor]]) -> float:
    total_tokens = sum(count_target_tokens(b) for b in batches)
    return sum(float(batch_loss(model, params, b)) * count_target_tokens(b) / total_tokens for b in batches)
