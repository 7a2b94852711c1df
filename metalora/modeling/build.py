"""The base model and its encoder, built from a whole config in one place.

Training, evaluation and the benchmarks all need the same pair: the frozen base on a device, with the
`speed` options that change how its forward pass is computed, and the encoder the `data` group describes.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from metalora.config import Config
from metalora.data.collation import Encoder
from metalora.modeling.models import load_model


def load_base(cfg: Config, device: torch.device | str = "cpu") -> tuple[PreTrainedModel, Encoder]:
    """The base model of `cfg.model` on `device` (no LoRA yet) and the encoder of `cfg.data`."""
    device = torch.device(device)
    model, tokenizer = load_model(
        cfg.model, force_cpu=device.type != "cuda", weight_first_logits=cfg.speed.weight_first_logits
    )
    model.to(device)
    return model, Encoder.from_config(tokenizer, cfg.data, device)
