"""The batch contract between data collation and the loss.

A batch is a dict of tensors. `labels` holds IGNORE_INDEX wherever no loss is taken; batches are
left-padded (or packed), so every target token sits in the last columns, and `logit_positions` names the
positions whose logits predict them (position p predicts token p + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class EpisodeBatches:
    """One task of a meta-batch as the method receives it: batches ready to forward, made on the data side
    (`metalora.data.episode_batches`), so the method knows nothing of examples, prompts or tokenizers."""

    task: str
    # Seeds the task's dropout masks, so its result does not depend on which process adapts it or what ran before.
    seed: int
    # Per inner step, the micro-batches of that step's support batch (one when the batch is forwarded whole).
    support: list[list[Batch]]
    # The batches the outer loss is taken on: the query set, or support and query together for multi-task.
    query: list[Batch]
