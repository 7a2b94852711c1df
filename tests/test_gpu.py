"""Checks that need CUDA: skipped on a CPU machine, run by `make gpu-check` where a GPU is lent."""

import pytest
import torch
from accelerate import Accelerator
from smoke import SMOKE

from metalora.config import load_config
from metalora.training.parts import build_parts
from metalora.training.step import training_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]


def test_a_bf16_meta_step_on_cuda_follows_the_fp32_cpu_step():
    moved = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "auto")):
        parts = build_parts(load_config(SMOKE, ["lora.dropout=0.0", f"model.dtype={dtype}"]), device)
        before = {k: v.detach().clone() for k, v in parts.shared.items()}
        training_step(parts, 0, Accelerator(cpu=device == "cpu"))
        assert next(parts.model.parameters()).dtype == (torch.bfloat16 if device == "cuda" else torch.float32)
        moved[device] = {k: (v.detach() - before[k]).float().cpu() for k, v in parts.shared.items()}
    for name, step in moved["cpu"].items():
        # Adam's first step has the sign of the gradient: bf16 rounding may flip only the tiniest entries.
        agree = (torch.sign(step) == torch.sign(moved["cuda"][name])).float().mean()
        assert agree > 0.9, name
