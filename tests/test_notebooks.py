"""Notebooks under papermill, the sweep runner and the report, on the tiny-random smoke settings."""

import json
import re
from pathlib import Path

import pandas as pd
import papermill
import pytest

from metalora.config import load_config, to_yaml
from metalora.report import ReportError, write_report
from metalora.stats import significance, summarise
from metalora.sweep import load_sweep, run_sweep, sweep_points

SMOKE_FILES = ["params/base.yaml", "params/smoke.yaml"]
FAST = [
    "data.heldout_tasks=[add_9,caesar_7]", "eval.n_shots=[0,2]", "eval.seeds=2", "eval.max_test=4",
    "eval.adapt_steps=2", "baseline.full_data_steps=2", "data.n_test=4",
]  # fmt: skip


def execute(name, tmp_path, **parameters):
    out = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(f"notebooks/{name}.ipynb", str(out), parameters=parameters, progress_bar=False)
    return json.loads(out.read_text())


def smoke_parameters(tmp_path, *extra):
    return {"config_files": SMOKE_FILES, "overrides": [*FAST, f"train.output_dir={tmp_path}", *extra]}


@pytest.mark.parametrize("name", ["00_quickstart", "01_meta_train", "02_few_shot_eval", "03_compare_methods",
                                  "04_ablations"])  # fmt: skip
def test_notebooks_have_one_parameters_cell_and_no_outputs(name):
    notebook = json.loads(Path(f"notebooks/{name}.ipynb").read_text())
    tagged = [c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    for line in "".join(tagged[0]["source"]).splitlines():
        assert ": " in line.split("=")[0] and "  # " in line, f"untyped or uncommented parameter: {line}"
    assert all(
        not c.get("outputs") and not c.get("execution_count") for c in notebook["cells"] if c["cell_type"] == "code"
    )


@pytest.mark.slow
def test_quickstart_writes_results_figures_and_report(tmp_path):
    execute("00_quickstart", tmp_path, **smoke_parameters(tmp_path))
    run = tmp_path / "smoke"
    summary = pd.read_csv(run / "eval" / "summary.csv")
    assert set(summary["method"]) == {"base", "lora", "multitask", "metalora"}
    for path in ("eval/few_shot.png", "eval/efficiency.png", "training.png", "report.md", "report.html"):
        assert (run / path).is_file(), path
    report = (run / "report.md").read_text()
    assert "## Few-shot results" in report and "![few-shot curves](eval/few_shot.png)" in report


@pytest.mark.slow
def test_meta_train_notebook_trains_in_process_and_shows_the_launch_command(tmp_path):
    notebook = execute("01_meta_train", tmp_path, **smoke_parameters(tmp_path))
    printed = "".join("".join(o.get("text", "")) for c in notebook["cells"] for o in c.get("outputs", []))
    assert "accelerate launch --config_file params/accelerate/multi_gpu.yaml -m metalora.train" in printed
    assert json.loads((tmp_path / "smoke" / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_few_shot_and_compare_notebooks(tmp_path):
    execute("02_few_shot_eval", tmp_path, **smoke_parameters(tmp_path, "eval.methods=[lora,metalora]"))
    assert set(pd.read_csv(tmp_path / "smoke" / "eval" / "results.csv")["method"]) == {"lora", "metalora"}
    execute("03_compare_methods", tmp_path, **smoke_parameters(tmp_path, "train.run_name=all"))
    efficiency = pd.read_csv(tmp_path / "all" / "eval" / "efficiency.csv")
    assert set(efficiency["method"]) == {"multitask", "metalora", "reptile", "fomaml"}
    fomaml, metalora = (efficiency.set_index("method").loc[m] for m in ("fomaml", "metalora"))
    assert fomaml["final_weights_bytes"] > 10 * metalora["final_weights_bytes"]


def write_sweep(tmp_path):
    sweep = {
        "notebook": "notebooks/02_few_shot_eval.ipynb",
        "config_files": SMOKE_FILES,
        "overrides": [*FAST, "eval.methods=[metalora]"],
        # n_support=500 loads as a config but fails at run time (the smoke tasks are too small)
        "grid": {"meta.n_support": [4, 500]},
        "output_dir": str(tmp_path / "sweeps"),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(sweep))
    return path


def test_sweep_files_are_checked_point_by_point(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"notebook": "n.ipynb", "config_files": SMOKE_FILES, "grid": {"lora.rank": [2]}}))
    with pytest.raises(Exception, match="point 'lora.rank=2'.*unknown key 'lora.rank'.*lora.r"):
        load_sweep(path)
    path.write_text(json.dumps({"notebook": "n.ipynb", "config_files": SMOKE_FILES}))
    with pytest.raises(Exception, match="grid.*cases"):
        load_sweep(path)
    for name in ("rank", "inner_steps", "samples_per_task", "order_and_algorithm"):
        assert sweep_points(load_sweep(f"params/ablations/{name}.yaml"))


@pytest.mark.slow
def test_sweep_skips_finished_points_records_failures_and_aggregates(tmp_path):
    root = run_sweep(write_sweep(tmp_path))
    points = pd.read_csv(root / "points.csv").set_index("point")
    assert points.loc["meta.n_support=4", "status"] == "ok"
    assert points.loc["meta.n_support=500", "status"] == "failed"
    assert "an episode needs n_support=500" in points.loc["meta.n_support=500", "error"]
    results = pd.read_csv(root / "results.csv")
    assert set(results["point"]) == {"meta.n_support=4"} and set(results["method"]) == {"metalora"}
    summary = pd.read_csv(root / "summary.csv")
    assert list(summary.columns[:2]) == ["meta.n_support", "method"] and (root / "sweep.png").is_file()
    finished = root / "meta.n_support=4" / "notebook.ipynb"
    stamp = finished.stat().st_mtime_ns
    run_sweep(write_sweep(tmp_path))
    assert finished.stat().st_mtime_ns == stamp, "a finished point ran again"
    assert "## Points" in write_report(root).read_text()


def test_report_from_a_fixture_run_directory(tmp_path):
    run = tmp_path / "fixture"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(load_config(SMOKE_FILES)))
    (run / "summary.json").write_text(json.dumps({"algorithm": "metalora", "steps": 2}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "stage2/meta_loss": 3.0 - s, "adaptation_gap": 0.1 * s}) + "\n" for s in range(3)
    ))  # fmt: skip
    rows = [{"method": m, "task": t, "n_shots": 5, "seed": s, "value": v + 0.1 * s}
            for m, v in (("metalora", 0.6), ("lora", 0.4)) for t in ("a", "b") for s in range(3)]  # fmt: skip
    results = pd.DataFrame(rows)
    summarise(results).to_csv(run / "eval" / "summary.csv", index=False)
    significance(results).to_csv(run / "eval" / "significance.csv", index=False)
    report = write_report(run, html=True).read_text()
    assert re.search(r"\| metalora +\|", report) and re.search(r"\| lora +\|", report)
    assert "## Significance" in report and "![training curves](training.png)" in report
    assert "<table>" in (run / "report.html").read_text()
    with pytest.raises(ReportError, match="neither a run directory"):
        write_report(tmp_path)
