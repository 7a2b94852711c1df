"""`metalora plan`: the steps and points it counts are the ones the evaluation then runs and scores."""

import json

import pandas as pd
import pytest
from smoke import SMOKE

from metalora.cli import main as cli_main
from metalora.config import load_config
from metalora.experiments.compare import run_evaluation
from metalora.experiments.plan import build_plan, calibrate

FAST = ["data.heldout_tasks=[add_9,caesar_7]", "eval.n_shots=[0,2]", "eval.seeds=2", "eval.max_test=2",
        "eval.adapt_steps=2", "data.n_test=4", "train.steps=2", "train.seeds=2", "baseline.full_data_steps=2",
        "eval.methods=[base,lora,multitask,metalora,full_data,constant]"]  # fmt: skip


@pytest.mark.slow
def test_the_plan_counts_the_steps_and_points_the_evaluation_then_runs(tmp_path):
    cfg = load_config(SMOKE, [f"train.output_dir={tmp_path}", *FAST])
    plan = build_plan(cfg)
    assert not any(run.finished or run.steps_done for run in plan.training) and not plan.points_done
    results = pd.read_csv(run_evaluation(cfg, train_missing=True) / "results.csv")
    # Scored points: every row but the constant answer's and lora's 0-shot rows (copies of the base model's).
    scored = results[(results["method"] != "constant") & ~((results["method"] == "lora") & (results["n_shots"] == 0))]
    counted = scored.groupby(["method", "n_shots"]).size().to_dict()
    assert dict(plan.points) == counted
    for run in plan.training:
        summary = json.loads((tmp_path / run.run_dir.split("/")[-1] / "summary.json").read_text())
        assert summary["steps"] == run.steps
    # On an existing experiment the plan is its progress, read from the run directories.
    after = build_plan(cfg)
    assert all(run.finished and run.steps_done == run.steps for run in after.training)
    assert after.points_done == after.points


def test_calibration_times_every_algorithm_and_shot_count(tmp_path, capsys):
    cfg = load_config(SMOKE, [f"train.output_dir={tmp_path}", *FAST])
    plan = build_plan(cfg)
    calibrate(cfg, plan)
    assert set(plan.seconds_per_step) == {"multitask", "metalora"} and min(plan.seconds_per_step.values()) > 0
    assert set(plan.seconds_per_point) == {0, 2, -1} and min(plan.seconds_per_point.values()) > 0
    assert plan.training_seconds() > 0 and plan.evaluation_seconds() > 0
    assert cli_main(["plan", *SMOKE, f"train.output_dir={tmp_path}", *FAST]) == 0
    out = capsys.readouterr().out
    assert "metalora        seed 1" in out and "not calibrated" in out
