"""The batch contract between data collation and the loss.

A batch is a dict of tensors. `labels` holds IGNORE_INDEX wherever no loss is taken; batches are
left-padded (or packed), so every target token sits in the last columns, and `logit_positions` names the
positions whose logits predict them (position p predicts token p + 1).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

IGNORE_INDEX = -100


def window_positions(width: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The positions whose logits predict the last `window` columns of a left-padded batch `width` wide.

    Args:
        window: T, the trailing columns that hold every target token.

    Returns:
        The T positions width-T-1 .. width-2 (position p predicts token p + 1).
    """
    return torch.arange(width - window - 1, width - 1, device=device)


Batch = dict[str, torch.Tensor]


class EpisodeLike(Protocol):
    """What the meta-step reads of an episode (`metalora.data.episodes.Episode` is one)."""

    task: str
    seed: int
    support: list[Any]
    query: list[Any]


class BatchMaker(Protocol):
    """Turns a task's examples into batches (`metalora.data.collation.Encoder` is one).

    The method passes tasks and examples through untouched, so it needs to know nothing of their format.
    """

    def batches(
        self, task: Any, examples: list[Any], batch_size: int, group_by_length: bool = False, pack_tokens: int = 0
    ) -> list[Batch]: ...

    def step_batches(
        self, task: Any, examples: list[Any], batch_size: int, micro_batch_size: int = 0, pack_tokens: int = 0
    ) -> list[list[Batch]]: ...
