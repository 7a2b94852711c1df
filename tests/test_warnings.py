"""No calls on borrowed time: the kit's training and evaluation use no API its libraries have deprecated."""

import pytest
from smoke import SMOKE

from metalora.config import load_config
from metalora.experiments.compare import run_evaluation


@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
def test_training_and_evaluation_raise_no_deprecation_warning(tmp_path):
    # Generation with the KV cache (exact-match tasks), option-free scoring, a LoRA and a full-model method, and
    # the adapters reloaded for evaluation: every library call the kit makes in a run.
    cfg = load_config(SMOKE, [f"train.output_dir={tmp_path}", "train.steps=2", "eval.seeds=1", "eval.max_test=2",
                              "eval.methods=[base,lora,metalora,fomaml]", "eval.n_shots=[0,2]",
                              "data.heldout_tasks=[add_9,caesar_7]", "data.n_test=4"])  # fmt: skip
    out = run_evaluation(cfg, train_missing=True)
    assert (out / "results.csv").is_file()
