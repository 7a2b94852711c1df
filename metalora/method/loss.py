"""The loss of a batch under a parameter dict, with logits computed only where targets are.

A batch names the positions whose logits predict a target token (`logit_positions`, see
`metalora/data/collation.py`): in a left-padded batch the T columns before the last (T = the longest
target), in a packed one exactly the position before each target token. The model's `logits_to_keep` takes just
those, which skips the vocabulary projection over all prompt tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalora.method.batch import IGNORE_INDEX, window_positions


def target_window(labels: torch.Tensor) -> int:
    """Return T, the number of trailing columns that hold every target token of a left-padded batch."""
    return int((labels != IGNORE_INDEX).sum(-1).max())


def target_logits(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
    """Return (logits, labels) at the target positions only.

    Args:
        model: the causal LM (with or without LoRA); names missing from `params` use its own tensors.
        params: parameters by name that replace the module's for this call (nothing is written into it).
        batch: a collated or packed batch (see `Encoder.collate`, `Encoder.pack`).

    Returns:
        logits [B, T, V] in float32 and the labels [B, T] they predict.
    """
    return positions_logits(model, params, batch, batch["logit_positions"])


def window_logits(
    model: torch.nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits, labels) of the last `window` target columns (no data-dependent branches: vmap-safe).

    Args:
        params: parameters by name for this forward pass.
        batch: a left-padded batch; its `attention_mask` may be 2-D or a ready 4-D mask.
        window: T, the trailing columns that hold every target token.

    Returns:
        logits [B, T, V] in float32 and the labels [B, T] they predict.
    """
    keep = window_positions(batch["labels"].shape[1], window, batch["labels"].device)
    return positions_logits(model, params, batch, keep)


def positions_logits(
    model: torch.nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits, labels) at the positions `keep` and the tokens they predict (one position on).

    Args:
        params: parameters by name for this forward pass.
        batch: a batch; its `attention_mask` may be 2-D, a ready 4-D mask, or absent (packed).
        keep: 1-D positions, the same in every row.

    Returns:
        logits [B, len(keep), V] in float32 and the labels [B, len(keep)] they predict.
    """
    out = functional_call(
        model,
        params,
        args=(),
        kwargs={
            "input_ids": batch["input_ids"],
            # None for a packed batch: the model builds its mask from the restarting positions.
            "attention_mask": batch.get("attention_mask"),
            "position_ids": batch["position_ids"],
            "logits_to_keep": keep,
            "use_cache": False,
        },
    )
    return out.logits.float(), batch["labels"][:, keep + 1]


def batch_loss(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens under `params`.

    Args:
        params: parameters by name for this forward pass.

    Returns:
        A scalar loss tensor (differentiable with respect to `params`).
    """
    logits, labels = target_logits(model, params, batch)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def count_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Return the number of tokens that carry a loss in `batch` (counted on the CPU at collation)."""
    return int(batch["target_tokens"])


def count_input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Return the number of real (non-padding) tokens a forward pass over `batch` processes."""
    return int(batch["input_tokens"])
