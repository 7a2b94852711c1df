"""Notebooks under papermill, the sweep runner and the report, on the tiny-random smoke settings."""

import json
import re
from pathlib import Path

import pandas as pd
import papermill
import pytest
from smoke import SMOKE

from metalora.config import load_config, to_yaml
from metalora.errors import MetaloraError
from metalora.experiments.compare import write_statistics
from metalora.experiments.sweep import load_sweep, sweep_points
from metalora.jobs.sweep import run_sweep
from metalora.reporting.report import ReportError, write_report

FAST = [
    "data.heldout_tasks=[add_9,caesar_7]", "eval.n_shots=[0,2]", "eval.seeds=2", "eval.max_test=4",
    "eval.adapt_steps=2", "baseline.full_data_steps=2", "data.n_test=4",
]  # fmt: skip


def execute(name, tmp_path, **parameters):
    out = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(f"notebooks/{name}.ipynb", str(out), parameters=parameters, progress_bar=False)
    return json.loads(out.read_text())


def smoke_parameters(tmp_path, *extra):
    return {"config_files": SMOKE, "overrides": [*FAST, f"train.output_dir={tmp_path}", *extra]}


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
    notebook = execute("00_quickstart", tmp_path, **smoke_parameters(tmp_path))
    run = tmp_path / "smoke"
    summary = pd.read_csv(run / "eval" / "summary.csv")
    assert set(summary["method"]) == {"base", "lora", "multitask", "metalora"}
    for path in ("eval/few_shot.png", "eval/efficiency.png", "training.png", "report.md", "report.html"):
        assert (run / path).is_file(), path
    report = (run / "report.md").read_text()
    figure = "![scores by method and shots](eval/few_shot.png)"
    assert report.index("## What the comparison shows") < report.index(figure)
    assert report.index("## Figure") < report.index("## Scores")
    # Figures render in the notebook: the files shown and the figure the library returns, as PNG outputs.
    sources = ["".join(c["source"]) for c in notebook["cells"]]
    cells = zip(notebook["cells"], sources, strict=True)
    figure_cells = [c for c, text in cells if "display(" in text and ".png" in text]
    assert figure_cells and all(any("image/png" in o.get("data", {}) for o in c["outputs"]) for c in figure_cells)
    curves = next(c for c in notebook["cells"] if "training_curves(" in "".join(c["source"]))
    assert any("image/png" in o.get("data", {}) for o in curves["outputs"]), "the returned figure did not render"
    printed = "".join("".join(o.get("text", "")) for c in notebook["cells"] for o in c.get("outputs", []))
    assert "At 2 shots on held-out tasks" in printed


@pytest.mark.slow
def test_meta_train_notebook_walks_through_one_step_then_trains_in_process(tmp_path):
    notebook = execute("01_meta_train", tmp_path, **smoke_parameters(tmp_path))
    printed = "".join("".join(o.get("text", "")) for c in notebook["cells"] for o in c.get("outputs", []))
    assert "accelerate launch --config_file params/accelerate/multi_gpu.yaml -m metalora.training.train" in printed
    assert json.loads((tmp_path / "smoke" / "summary.json").read_text())["steps"] == 3
    # The walk-through: the meta-batch's table, the support loss falling, the meta-gradient, what moved.
    def outputs_of(call: str) -> list[dict]:
        return next(c for c in notebook["cells"] if call in "".join(c["source"]))["outputs"]

    assert any("text/html" in o.get("data", {}) for o in outputs_of("episode_table("))
    assert any("support step 0" in "".join(o.get("data", {}).get("text/plain", "")) for o in outputs_of("batch_table("))
    for call in ("adapt_task(", "meta_gradients(", "apply_meta_gradient("):
        assert any("image/png" in o.get("data", {}) for o in outputs_of(call)), f"no figure after {call}"
    assert "meta-gradient norm" in printed


@pytest.mark.slow
def test_few_shot_and_compare_notebooks(tmp_path):
    # The held-out scenario runs through this notebook in the sweep tests; the seen scenario is a parameters-cell
    # change, not another notebook.
    seen = smoke_parameters(tmp_path, "eval.methods=[lora,multitask_full,metalora]", "train.run_name=seen",
                            "data.samples_per_task=12", "baseline.multitask_full_epochs=0.05")  # fmt: skip
    execute("02_few_shot_eval", tmp_path, **seen, eval={"scenario": "seen"})
    results = pd.read_csv(tmp_path / "seen" / "eval" / "results.csv")
    assert set(results["setting"]) == {"seen", "heldout"} and "multitask_full" in set(results["method"])
    compared = execute("03_compare_methods", tmp_path, **smoke_parameters(tmp_path, "train.run_name=all"))
    shown = [o.get("data", {}).get("text/markdown", "") for c in compared["cells"] for o in c.get("outputs", [])]
    assert any("## Answers" in "".join(text) for text in shown), "the answers behind the scores were not shown"
    efficiency = pd.read_csv(tmp_path / "all" / "eval" / "efficiency.csv")
    assert set(efficiency["method"]) == {"multitask", "metalora", "reptile", "fomaml"}
    fomaml, metalora = (efficiency.set_index("method").loc[m] for m in ("fomaml", "metalora"))
    assert fomaml["final_weights_bytes"] > 10 * metalora["final_weights_bytes"]


def write_sweep(tmp_path):
    sweep = {
        "notebook": "notebooks/02_few_shot_eval.ipynb",
        "config_files": SMOKE,
        "overrides": [*FAST, "eval.methods=[metalora]"],
        # meta_batch_size=999 loads as a config but fails at run time (the suite has fewer training tasks)
        "grid": {"meta.meta_batch_size": [2, 999]},
        "output_dir": str(tmp_path / "sweeps"),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(sweep))
    return path


def test_sweep_files_are_checked_point_by_point(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"notebook": "n.ipynb", "config_files": SMOKE, "grid": {"lora.rank": [2]}}))
    with pytest.raises(Exception, match="point 'lora.rank=2'.*unknown key 'lora.rank'.*lora.r"):
        load_sweep(path)
    path.write_text(json.dumps({"notebook": "n.ipynb", "config_files": SMOKE}))
    with pytest.raises(Exception, match="grid.*cases"):
        load_sweep(path)
    for name in ("rank", "inner_steps", "samples_per_task", "order_and_algorithm", "seen_budget"):
        assert sweep_points(load_sweep(f"params/ablations/{name}.yaml"))


@pytest.mark.slow
def test_sweep_skips_finished_points_records_failures_and_aggregates(tmp_path, capsys):
    root, _ = run_sweep(write_sweep(tmp_path), executor="debug")
    assert "run directory:" in capsys.readouterr().out, "the points' output did not stream"
    points = pd.read_csv(root / "points.csv").set_index("point")
    assert points.loc["meta.meta_batch_size=2", "status"] == "ok"
    assert points.loc["meta.meta_batch_size=999", "status"] == "failed"
    assert "meta.meta_batch_size=999 is larger than the" in points.loc["meta.meta_batch_size=999", "error"]
    results = pd.read_csv(root / "results.csv")
    assert set(results["point"]) == {"meta.meta_batch_size=2"} and set(results["method"]) == {"metalora"}
    summary = pd.read_csv(root / "summary.csv")
    assert list(summary.columns[:3]) == ["meta.meta_batch_size", "setting", "method"] and (root / "sweep.png").is_file()
    finished = root / "meta.meta_batch_size=2" / "notebook.ipynb"
    stamp = finished.stat().st_mtime_ns
    run_sweep(write_sweep(tmp_path), executor="debug")
    assert finished.stat().st_mtime_ns == stamp, "a finished point ran again"
    assert "## Points" in write_report(root).read_text()


def test_report_from_a_fixture_run_directory(tmp_path):
    run = tmp_path / "fixture"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(load_config(SMOKE)))
    (run / "summary.json").write_text(json.dumps({"algorithm": "metalora", "steps": 2}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "stage2/meta_loss": 3.0 - s, "adaptation_gap": 0.1 * s}) + "\n" for s in range(3)
    ))  # fmt: skip
    # lora trails metalora by 0.2 on four tasks, by 0.1 on a fifth; multitask leads it by 0.05 +- 0.1 (no clear sign)
    rows = [{"method": m, "task": t, "n_shots": 5, "seed": s, "value": v + 0.1 * s + (0.1 * (m == "lora") * (t == "e"))
             + (0.1 * (-1) ** i * (m == "multitask"))}
            for m, v in (("metalora", 0.6), ("lora", 0.4), ("multitask", 0.65))
            for i, t in enumerate("abcde") for s in range(3)]  # fmt: skip
    write_statistics(pd.DataFrame(rows), run / "eval", reference="metalora")
    report = write_report(run, html=True).read_text()
    assert re.search(r"\| metalora +\|", report) and re.search(r"\| lora +\|", report)
    assert "## Paired differences" in report and "![training curves](training.png)" in report
    # Sentences, then every figure, then the tables, then the run's particulars.
    assert report.index("![training curves]") < report.index("## Scores") < report.index("## Training summary")
    # The report opens with one sentence per comparison, and each says what the table says.
    opening = report.split("## What the comparison shows\n\n")[1].split("\n\n")[0].splitlines()
    table = pd.read_csv(run / "eval" / "significance.csv").set_index("method")
    assert len(opening) == 2 and report.index("What the comparison shows") < report.index("## Figure")
    lora_line = next(line for line in opening if "standard LoRA" in line)
    lead = -table.loc["lora", "mean_diff"]
    assert lora_line.startswith(f"- At 5 shots on held-out tasks, MeTA-LoRA is ahead of standard LoRA (fresh init) "
                                f"by {lead:.3f} (95 % CI {-table.loc['lora', 'ci_high']:.3f} to")  # fmt: skip
    # One training run (the fixture has no training seeds): beyond the noise it covers, but not a finding.
    assert "; 5 tasks): beyond task and evaluation noise, but one training run per method" in lora_line
    assert "a clear difference" not in report
    multitask_line = next(line for line in opening if "multi-task" in line)
    assert "multi-task LoRA is ahead of MeTA-LoRA" in multitask_line
    assert "not a significant difference" in multitask_line and "80 % power" in multitask_line
    assert "<table>" in (run / "report.html").read_text()
    with pytest.raises(ReportError, match="neither a run directory"):
        write_report(tmp_path)


def test_a_report_refuses_damaged_tables_and_a_record_from_outside_the_run(tmp_path):
    run = tmp_path / "fixture"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(load_config(SMOKE)))
    rows = [{"method": m, "task": t, "n_shots": 5, "seed": 0, "value": v} for m, v in (("metalora", 0.6), ("lora", 0.4))
            for t in "abcde"]  # fmt: skip
    write_statistics(pd.DataFrame(rows), run / "eval", reference="metalora")
    assert write_report(run).is_file()
    results = run / "eval" / "results.csv"
    results.write_text("\n".join(results.read_text().splitlines()[:-3]) + "\n")  # truncated: three rows lost
    with pytest.raises(ReportError, match="summary.csv does not match results.csv"):
        write_report(run)
    write_statistics(pd.DataFrame(rows), run / "eval", reference="metalora")
    (run / "eval" / "summary.csv").unlink()
    with pytest.raises(ReportError, match="summary.csv: missing"):
        write_report(run)
    write_statistics(pd.DataFrame(rows), run / "eval", reference="metalora")
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text(json.dumps({"step": 0, "stage2/meta_loss": 1.0}) + "\n")
    (run / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(MetaloraError, match="links outside its run directory"):
        write_report(run)
