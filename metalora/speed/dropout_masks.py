"""LoRA dropout whose CPU masks come from numpy's PCG64 instead of torch's CPU generator.

torch fills a CPU dropout mask element by element from its Mersenne Twister (`bernoulli_`), a visible share
of a CPU meta-step (`metalora bench --profile`). numpy's PCG64 fills the same mask from 16 random bits per
element, in less time per call (`python -m metalora.benchmarks.dropout_masks`; the figures are in
docs/performance.md). Each mask's generator is seeded from torch's
CPU generator, so `torch.manual_seed` still decides every mask and the kit's per-episode seeding is
unchanged. On other devices torch's own (fused) dropout runs. So does it inside `torch_dropout_masks()`,
which the task-batched path uses: `torch.func.vmap` draws different masks per task only from torch's
generator, and a numpy mask would be shared by every task. A compiled graph (`metalora/speed/compiled_layers.py`)
draws its masks with the compiler's random numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

MASK_LEVELS = 2**16  # one uint16 per element: p is rounded to a multiple of 2**-16
SEED_BOUND = 2**63 - 1
# The profiler sees torch operators only; this label puts numpy's mask time in a profile too.
PROFILE_LABEL = "metalora::numpy_dropout_mask"

_torch_masks_only: ContextVar[bool] = ContextVar("torch_masks_only", default=False)


@contextmanager
def torch_dropout_masks() -> Iterator[None]:
    """Within this context every `NumpyMaskDropout` draws its masks with torch's own dropout."""
    token = _torch_masks_only.set(True)
    try:
        yield
    finally:
        _torch_masks_only.reset(token)


class NumpyMaskDropout(torch.nn.Module):
    """Inverted dropout, as `torch.nn.Dropout`, with CPU masks drawn by numpy's PCG64.

    An element is dropped when its uniform 16-bit draw is below round(p * 2**16), so the drop
    probability actually used is `effective_p` (within 2**-17 of p); kept elements are scaled by
    1 / (1 - effective_p), which keeps the expected output equal to the input exactly.

    Args:
        p: drop probability in [0, 1).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.dropped_levels = round(p * MASK_LEVELS)
        self.effective_p = self.dropped_levels / MASK_LEVELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop and rescale elements of `x` in training mode; the identity in eval mode."""
        if not self.training or self.p == 0.0:
            return x
        # A compiled graph draws its own masks (and cannot trace numpy's generator or the context variable).
        if x.device.type != "cpu" or torch.compiler.is_compiling() or _torch_masks_only.get():
            return F.dropout(x, self.p, training=True)
        with record_function(PROFILE_LABEL):
            seed = int(torch.randint(0, SEED_BOUND, (1,)))
            count = x.numel()
            raw = np.random.PCG64(seed).random_raw((count + 3) // 4)
            keep = (raw.view(np.uint16)[:count] >= self.dropped_levels).astype(np.float32)
            keep *= np.float32(1.0 / (1.0 - self.effective_p))
        return x * torch.from_numpy(keep).view(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_numpy_dropout(model: torch.nn.Module) -> int:
    """Replace every `torch.nn.Dropout` among peft's LoRA dropout modules with `NumpyMaskDropout`.

    Args:
        model: a peft model (its LoRA layers hold their dropout in `lora_dropout` module dicts).

    Returns:
        How many dropout modules were replaced (0 when LoRA dropout is off: peft uses Identity then).
    """
    replaced = 0
    for module in model.modules():
        per_adapter = getattr(module, "lora_dropout", None)
        if not isinstance(per_adapter, torch.nn.ModuleDict):
            continue
        for adapter, dropout in per_adapter.items():
            if isinstance(dropout, torch.nn.Dropout):
                per_adapter[adapter] = NumpyMaskDropout(dropout.p)
                replaced += 1
    return replaced
