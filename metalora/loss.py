"""The loss of a batch under a parameter dict, with logits computed only where targets are.

Rows are left-padded and end with their target, so every target token lies in the last T columns
(T = the longest target). The model's `logits_to_keep` takes exactly the T positions that predict
them, which skips the vocabulary projection over all prompt tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalora.episodes import IGNORE_INDEX


def target_window(labels: torch.Tensor) -> int:
    """Return T, the number of trailing columns that hold every target token of the batch."""
    return int((labels != IGNORE_INDEX).sum(-1).max())


def target_logits(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
    """Return (logits, labels) at the target positions only.

    Args:
        model: the causal LM (with or without LoRA); names missing from `params` use its own tensors.
        params: parameters by name that replace the module's for this call (nothing is written into it).
        batch: a collated batch (see `Encoder.collate`).

    Returns:
        logits [B, T, V] in float32 and the labels [B, T] they predict.
    """
    return window_logits(model, params, batch, target_window(batch["labels"]))


def window_logits(
    model: torch.nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits, labels) of the last `window` target columns (no data-dependent branches: vmap-safe).

    Args:
        model: the causal LM.
        params: parameters by name for this forward pass.
        batch: a collated batch; its `attention_mask` may be 2-D or a ready 4-D mask.
        window: T, the trailing columns that hold every target token.

    Returns:
        logits [B, T, V] in float32 and the labels [B, T] they predict.
    """
    labels = batch["labels"]
    width = labels.shape[1]
    # Position p predicts token p + 1, so the logits needed are those of positions width-T-1 .. width-2.
    keep = torch.arange(width - window - 1, width - 1, device=labels.device)
    out = functional_call(
        model,
        params,
        args=(),
        kwargs={
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "position_ids": batch["position_ids"],
            "logits_to_keep": keep,
            "use_cache": False,
        },
    )
    return out.logits.float(), labels[:, width - window :]


def batch_loss(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens under `params`.

    Args:
        model: the causal LM.
        params: parameters by name for this forward pass.
        batch: a collated batch.

    Returns:
        A scalar loss tensor (differentiable with respect to `params`).
    """
    logits, labels = target_logits(model, params, batch)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def count_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Return the number of tokens that carry a loss in `batch`."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def count_input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Return the number of real (non-padding) tokens a forward pass over `batch` processes."""
    return int(batch["attention_mask"].sum())
