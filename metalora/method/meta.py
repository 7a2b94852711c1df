"""The meta-gradient of one meta-batch for MeTA-LoRA, FOMAML, Reptile and multi-task training.

Every algorithm adapts each task from the shared weights (or not at all) and turns the adapted weights into that
task's gradient on the shared weights; `meta_gradients` runs the loop over tasks and the averaging once, and
`ALGORITHMS` says per algorithm what differs:
- metalora, first order, and fomaml: the query-loss gradient at the adapted weights (fomaml is the same over all
  base weights instead of the LoRA weights);
- metalora, second order: the query-loss gradient differentiated back through the inner loop to the shared weights;
- reptile: minus the displacement (adapted - shared), so an SGD meta-optimizer with lr = reptile_step_size moves the
  shared weights by that fraction of the mean displacement;
- multitask: no inner loop; the gradient of the loss on support and query together at the shared weights (plain
  multi-task training, the multi-task LoRA baseline).
The training step (`metalora/training/step.py`) reduces the result, clips it and hands it to the meta-optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from metalora.config import MetaConfig
from metalora.method.adapt import Params, adapt
from metalora.method.batch import Batch, EpisodeBatches
from metalora.method.loss import batch_loss, count_target_tokens
from metalora.method.task_stats import TaskStats, forwarded_tokens, task_stats

# A task's (outer loss, gradient on the shared weights in their order) from the shared and the adapted weights
# and the outer-loss batches; the gradient is divided by the last argument, the tasks of the whole meta-batch.
TaskGradient = Callable[[torch.nn.Module, Params, Params, list[Batch], int], tuple[float, list[torch.Tensor]]]


def query_loss_and_grad(
    model: torch.nn.Module, adapted: Params, wrt: list[torch.Tensor], batches: list[Batch], weight: float
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


def gradient_at_adapted(
    model: torch.nn.Module, shared: Params, adapted: Params, query: list[Batch], total_tasks: int
) -> tuple[float, list[torch.Tensor]]:
    """First order: the query gradient at the adapted weights stands in for the gradient at the shared ones."""
    return query_loss_and_grad(model, adapted, list(adapted.values()), query, 1.0 / total_tasks)


def gradient_through_inner_loop(
    model: torch.nn.Module, shared: Params, adapted: Params, query: list[Batch], total_tasks: int
) -> tuple[float, list[torch.Tensor]]:
    """Second order: the query loss at the adapted weights differentiated back through every inner step."""
    return query_loss_and_grad(model, adapted, list(shared.values()), query, 1.0 / total_tasks)


def reptile_displacement(
    model: torch.nn.Module, shared: Params, adapted: Params, query: list[Batch], total_tasks: int
) -> tuple[float, list[torch.Tensor]]:
    """Minus the displacement the inner loop made (shared - adapted); the query loss is only reported."""
    with torch.no_grad():
        loss = mean_loss(model, adapted, query)
        return loss, [(shared[n].detach() - adapted[n].detach()) / total_tasks for n in shared]


def multitask_gradient(
    model: torch.nn.Module, shared: Params, adapted: Params, query: list[Batch], total_tasks: int
) -> tuple[float, list[torch.Tensor]]:
    """No adaptation (`adapted` holds the shared values): the plain gradient of the loss on the task's examples."""
    return query_loss_and_grad(model, shared, list(shared.values()), query, 1.0 / total_tasks)


@dataclass(frozen=True)
class Algorithm:
    """What one algorithm does with a task: whether it adapts, whether the graph runs through the inner loop, how
    the adapted weights become the task's gradient, and whether its outer loss takes the support examples too (the
    data side reads that when it makes the batches)."""

    adapts: bool
    second_order: bool
    task_gradient: TaskGradient
    loss_on_support: bool = False


ALGORITHMS = {
    "metalora": Algorithm(adapts=True, second_order=False, task_gradient=gradient_at_adapted),
    "metalora-second-order": Algorithm(adapts=True, second_order=True, task_gradient=gradient_through_inner_loop),
    "fomaml": Algorithm(adapts=True, second_order=False, task_gradient=gradient_at_adapted),
    "reptile": Algorithm(adapts=True, second_order=False, task_gradient=reptile_displacement),
    "multitask": Algorithm(adapts=False, second_order=False, task_gradient=multitask_gradient, loss_on_support=True),
}


def algorithm_of(cfg: MetaConfig) -> Algorithm:
    """The `ALGORITHMS` entry of `meta.algorithm` (MeTA-LoRA's by `meta.first_order`)."""
    second_order = cfg.algorithm == "metalora" and not cfg.first_order
    return ALGORITHMS["metalora-second-order" if second_order else cfg.algorithm]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's CPU generator seeded with `seed` inside, restored after: a task's dropout masks come from its
    episode's seed, so its result does not depend on which process adapts it or what ran before it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def adapt_task(
    model: torch.nn.Module, shared: Params, episode: EpisodeBatches, cfg: MetaConfig
) -> tuple[Params, list[float]]:
    """The task's inner loop as its algorithm runs it (none for multitask; kept differentiable for second order):
    the adapted weights and the support loss before each inner step. Run it under `seeded(episode.seed)` to draw
    the dropout masks the meta-step draws."""
    algorithm = algorithm_of(cfg)
    steps = cfg.inner_steps if algorithm.adapts else 0
    return adapt(model, shared, episode.support, steps, cfg.inner_lr, optimizer=cfg.inner_optimizer,
                 first_order=not algorithm.second_order)  # fmt: skip


def task_gradient(
    model: torch.nn.Module, shared: Params, episode: EpisodeBatches, cfg: MetaConfig, total_tasks: int
) -> tuple[list[torch.Tensor], TaskStats]:
    """One task's term of the meta-gradient (its gradient divided by `total_tasks`) and its statistics."""
    with seeded(episode.seed):
        adapted, inner = adapt_task(model, shared, episode, cfg)
        loss, grads = algorithm_of(cfg).task_gradient(model, shared, adapted, episode.query, total_tasks)
        support_after = support_check(model, adapted, episode.support) if cfg.measure_gap else None
    tokens = forwarded_tokens(episode.support, episode.query, len(inner), cfg.measure_gap)
    return grads, task_stats(episode.task, inner, support_after, loss, tokens)


def meta_gradients(
    model: torch.nn.Module, shared: Params, episodes: list[EpisodeBatches], cfg: MetaConfig, total_tasks: int
) -> tuple[list[torch.Tensor], list[TaskStats]]:
    """This process's share of the meta-gradient, one task at a time: the sum of its tasks' gradients divided by
    `total_tasks` (the tasks of the whole meta-batch, all processes), so that summing the processes' shares gives
    the mean over tasks. Returns one gradient per tensor of `shared`, in its order, and each task's statistics.
    Each task's graph is freed before the next starts, so memory does not grow with the meta-batch."""
    grads = [torch.zeros_like(value) for value in shared.values()]
    stats = []
    for episode in episodes:
        task_grads, task = task_gradient(model, shared, episode, cfg, total_tasks)
        torch._foreach_add_(grads, task_grads)
        stats.append(task)
    return grads, stats


def support_check(model: torch.nn.Module, adapted: Params, support: list[list[Batch]]) -> float:
    """The loss on the first support batch at the adapted weights (the adaptation gap's other side)."""
    with torch.no_grad():
        return mean_loss(model, adapted, support[0])


def mean_loss(model: torch.nn.Module, params: Params, batches: list[Batch]) -> float:
    """Token-weighted mean loss over `batches` under `params`."""
    total_tokens = sum(count_target_tokens(b) for b in batches)
    return sum(float(batch_loss(model, params, b)) * count_target_tokens(b) / total_tokens for b in batches)
