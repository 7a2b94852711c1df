"""The paper's runs rehearsed at their real shapes (`make rehearsal`): each `params/paper/*.yaml` end to end, with
only the model swapped for a random 2-layer model of the same family and the step counts, test sets and evaluation
seeds cut (two training seeds of the files' three kept, so that per-seed runs and their statistics are rehearsed).
Sequence lengths, support/query sizes, inner steps, LoRA rank, meta-batch, scenario, methods and shot
counts are the files' own. The data comes from `metalora prepare-data` run on local parquet and JSON files written in
the schemas of the datasets params/paper/README.md names, read through `datasets.load_dataset` as a hub copy is."""

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from metalora.cli import main as cli_main
from metalora.config import TRAINED_METHODS, load_config

ROOT = Path(__file__).resolve().parent.parent
PAPER = sorted((ROOT / "params" / "paper").glob("*.yaml"))
XCOPA = ROOT / "data" / "xcopa"
# The paper files' hub models -> the tiny random model of the same family.
SAME_FAMILY = {"meta-llama/Llama-3.2-1B": "tiny-random-llama", "Qwen/Qwen2.5-0.5B": "tiny-random-qwen2"}
# What is cut: steps, training seeds (3 -> 2), test-set sizes, evaluation seeds and the full-data reference's steps;
# never a shape. params/paper/README.md lists the same cuts.
CUTS = ["train.steps=2", "train.seeds=2", "train.checkpoint_every=1", "eval.seeds=1", "eval.max_test=3",
        "baseline.full_data_steps=2"]  # fmt: skip
# Enough examples per task for the files' budgets and test sets (seen: 200 test + 100 budget; held-out: 200 test
# carved from half the task, and 100 shots from the rest).
ROWS_PER_TASK = 320

pytestmark = pytest.mark.rehearsal


def long_text(rng: random.Random, words: int) -> str:
    vocabulary = ["integer", "triangle", "prime", "ratio", "sum", "area", "circle", "remainder", "digit", "angle"]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def write_sources(root: Path) -> dict[str, Path]:
    """Local files in the MATH (parquet), GSM8K (JSON lines) and ScienceQA (parquet) schemas; some problems run past
    the files' 512-token prompt limit, so prompts are cut as they are in a real run."""
    rng = random.Random(0)
    math_rows = [
        {"problem": f"Problem {i}: {long_text(rng, rng.choice([20, 140]))}. What is {i} + {i % 7}?",
         "level": f"Level {1 + i % 5}", "type": subject,
         "solution": f"Add them: {i} + {i % 7} = \\boxed{{{i + i % 7}}}."}
        for subject in ("Algebra", "Prealgebra", "Geometry", "Number Theory") for i in range(ROWS_PER_TASK)
    ]  # fmt: skip
    gsm8k_rows = [
        {"question": f"A shop sells {i} apples and then {i % 9} more. How many apples? {long_text(rng, 30)}",
         "answer": f"It sells {i} + {i % 9} = {i + i % 9} apples.\n#### {i + i % 9:,}"}
        for i in range(ROWS_PER_TASK)
    ]  # fmt: skip
    science_rows = [
        {"question": f"Which choice names item {i}?", "choices": [f"item {i + (k - i) % 3}" for k in range(3)],
         "answer": i % 3, "hint": long_text(rng, 40) if i % 2 else "", "subject": subject}
        for subject in ("natural science", "social science") for i in range(ROWS_PER_TASK)
    ]  # fmt: skip
    paths = {"math": root / "math.parquet", "gsm8k": root / "gsm8k.jsonl", "scienceqa": root / "scienceqa.parquet"}
    pd.DataFrame(math_rows).to_parquet(paths["math"])
    paths["gsm8k"].write_text("".join(json.dumps(row) + "\n" for row in gsm8k_rows))
    pd.DataFrame(science_rows).to_parquet(paths["scienceqa"])
    return paths


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory) -> Path:
    """A working directory holding data/paper/{math,gsm8k,scienceqa}, prepared as params/paper/README.md says."""
    root = tmp_path_factory.mktemp("paper")
    sources = write_sources(root)
    builders = {"math": "parquet", "gsm8k": "json", "scienceqa": "parquet"}
    for kind, path in sources.items():
        status = cli_main(["prepare-data", kind, "--dataset", builders[kind], "--data-files", str(path),
                           "--split", "train", "--out", str(root / "data" / "paper" / kind)])  # fmt: skip
        assert status == 0, kind
    return root


def test_every_paper_model_has_a_tiny_model_of_its_family():
    assert {load_config([ROOT / "params" / "base.yaml", p]).model.name for p in PAPER} <= set(SAME_FAMILY)


@pytest.mark.parametrize("paper", PAPER, ids=[p.stem for p in PAPER])
def test_a_paper_file_runs_end_to_end_at_its_shapes(paper, paper_data, monkeypatch):
    files = [ROOT / "params" / "base.yaml", paper]
    original = load_config(files)
    overrides = [f"model.name={SAME_FAMILY[original.model.name]}", *CUTS]
    if any("xcopa" in suite for suite in original.data.suites):
        overrides.append(f"data.suites=[{XCOPA}]")
    monkeypatch.chdir(paper_data)
    assert cli_main(["eval", *map(str, files), *overrides, "--train-missing"]) == 0

    cfg = load_config(files, overrides)
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    seeds = {cfg.train.seed, cfg.train.seed + 1}
    # One run directory per trained method and training seed, each with its own seed recorded.
    for seed in seeds:
        assert load_config([run_dir.with_name(f"{run_dir.name}-seed{seed}") / "config.yaml"]).train.seed == seed
    trained = load_config([run_dir.with_name(f"{run_dir.name}-seed{cfg.train.seed}") / "config.yaml"])
    shapes = ("max_prompt_tokens", "max_target_tokens", "samples_per_task", "support_fraction")
    assert all(getattr(trained.data, k) == getattr(original.data, k) for k in shapes)
    assert trained.meta == original.meta and trained.lora == original.lora
    assert trained.model.dtype == "bfloat16" and trained.train.mixed_precision == "bf16"
    results = pd.read_csv(run_dir / "eval" / "results.csv")
    expected = set(original.eval.methods) - {"base", "full_data", "constant"}
    assert expected <= set(results["method"])
    lora = results[results["method"] == "lora"]
    assert set(original.eval.n_shots) - {0} <= set(lora["n_shots"])
    assert results["finite"].all()
    for method in expected & set(TRAINED_METHODS):
        assert set(results[results["method"] == method]["train_seed"]) == seeds, method
    # Two training runs per method: the comparisons include run-to-run variation.
    significance = pd.read_csv(run_dir / "eval" / "significance.csv")
    assert significance["run_variation_included"].all()
