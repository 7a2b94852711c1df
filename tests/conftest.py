"""Shared fixtures. Tests never reach the hub."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from metalora.config import ModelConfig  # noqa: E402
from metalora.modeling.models import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_TASKS = ROOT / "data" / "tasks"


@pytest.fixture
def tiny():
    """A fresh tiny-random model and its tokenizer."""
    return load_model(ModelConfig(name="tiny-random"))


@pytest.fixture
def shared_tasks() -> Path:
    """The real task suite shipped with the project (LAMA, classic classification, BIG-Bench Hard, GSM8K)."""
    assert (SHARED_TASKS / "tasks.json").is_file(), f"the project's task data is missing at {SHARED_TASKS}"
    return SHARED_TASKS


@pytest.fixture
def nudge_lora_b():
    """A function that sets the LoRA B weights of built training parts to small values fixed by each weight's name.

    B = 0 (peft's start) makes the gradient wrt A zero; a non-zero B, the same in all parts built
    alike, exercises every LoRA weight in comparisons between two builds.
    """

    def nudge(parts) -> None:
        with torch.no_grad():
            for name, p in parts.shared.items():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p, generator=torch.Generator().manual_seed(len(name))) * 0.05)

    return nudge


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread here and in the processes this test starts, as in a job given one CPU: the same summation
    order, so the job's results can be held bit-identical to this process's."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
