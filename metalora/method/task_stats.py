"""What each task of a meta-batch reports, whichever path computed its gradient."""

from __future__ import annotations

from dataclasses import dataclass

from metalora.method.batch import Batch
from metalora.method.loss import count_input_tokens


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


def task_stats(task: str, inner: list[float], support_after: float | None, query_loss: float, tokens: int) -> TaskStats:
    """The statistics of a task whose inner losses were `inner` (empty without inner steps, where the support
    check, when measured, stands in for both the first and the last inner loss)."""
    first = inner[0] if inner else support_after
    return TaskStats(task, first, inner[-1] if inner else first, support_after, query_loss, tokens)


def forwarded_tokens(support: list[list[Batch]], query: list[Batch], inner_steps: int, gap: bool) -> int:
    """Real tokens forwarded for one task: one support batch (all its micro-batches) per inner step, every query
    batch, and the support check when `gap`."""

    def tokens(step: list[Batch]) -> int:
        return sum(count_input_tokens(b) for b in step)

    inner_tokens = sum(tokens(support[i % len(support)]) for i in range(inner_steps))
    return inner_tokens + sum(count_input_tokens(b) for b in query) + (tokens(support[0]) if gap else 0)
