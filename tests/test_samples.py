"""Views of the per-item answers: items the methods disagree on, the most common wrong answers, the report's section."""

import pandas as pd
import pytest

from metalora.evaluation.samples import (
    SAMPLES_FILE,
    common_wrong_answers,
    disagreements,
    load_samples,
    wrong_answer_table,
)
from metalora.reporting.report import answers_section


def answers(method: str, given: list[str], n_shots: int = 4, seed: int = 0, train_seed: int = 0) -> list[dict]:
    targets = ["paris", "rome", "oslo"]
    return [{"setting": "heldout", "method": method, "train_seed": train_seed, "task": "capital", "n_shots": n_shots,
             "seed": seed, "item": i, "example_id": f"capital:{i}", "prompt": f"capital {i}", "target": t,
             "answer": a, "correct": a == t, "option_scores": [], "loss": 1.0}
            for i, (t, a) in enumerate(zip(targets, given, strict=True))]  # fmt: skip


@pytest.fixture
def samples() -> pd.DataFrame:
    return pd.DataFrame(
        answers("lora", ["paris", "madrid", "madrid"])
        + answers("metalora", ["paris", "rome", "madrid"])
        # Other points of the same methods: fewer shots, another evaluation seed, a second training seed.
        + answers("lora", ["x", "x", "x"], n_shots=0)
        + answers("metalora", ["paris", "x", "x"], seed=1)
        + answers("metalora", ["y", "y", "y"], train_seed=1)
    )


def test_disagreements_show_only_items_one_method_gets_right_and_another_wrong(samples):
    table = disagreements(samples)
    # At 4 shots, evaluation seed 0, first training seed: item 0 both right, item 2 both wrong, item 1 split.
    assert table[["example_id", "target"]].values.tolist() == [["capital:1", "rome"]]
    assert table.loc[0, "lora"] == "madrid (wrong)" and table.loc[0, "metalora"] == "rome (right)"


def test_common_wrong_answers_count_over_every_point(samples):
    common = common_wrong_answers(samples, top=1).set_index("method")
    assert common.loc["lora", "answer"] == "x" and common.loc["lora", "count"] == 3
    assert common.loc["lora", "share of wrong"] == pytest.approx(3 / 5)
    assert common.loc["metalora", "answer"] == "y" and common.loc["metalora", "count"] == 3
    table = wrong_answer_table(samples)
    assert table.loc[0, "lora"] == "'x' x3"


def test_the_reports_answer_section_and_the_loader(samples, tmp_path):
    section = answers_section(samples)
    assert "## Answers" in section and "rome (right)" in section and "'y' x3" in section
    samples.to_parquet(tmp_path / SAMPLES_FILE, index=False)
    pd.testing.assert_frame_equal(load_samples(tmp_path), samples)
    with pytest.raises(FileNotFoundError, match="eval.samples=true"):
        load_samples(tmp_path / "elsewhere")
