"""The figures show what their tables hold."""

import json

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg

from metalora.evaluation.stats import per_task
from metalora.reporting.plots import METHOD_LABELS, comparison_training_curves, few_shot_figure, per_task_figure


def _rows(methods: list[str], shots: list[int], tasks: int) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "method": m,
                "task": f"t{t}",
                "n_shots": n,
                "seed": 0,
                "value": (t + i) / 10,
                "setting": "heldout",
                "train_seed": -1,
            }  # fmt: skip
            for i, m in enumerate(methods)
            for n in shots
            for t in range(tasks)
        ]
    )


def _summary(results: pd.DataFrame) -> pd.DataFrame:
    means = results.groupby(["setting", "method", "n_shots"], as_index=False)["value"].mean()
    return means.rename(columns={"value": "mean"}).assign(ci_low=lambda f: f["mean"] - 0.1,
                                                          ci_high=lambda f: f["mean"] + 0.1)  # fmt: skip


def test_one_shot_count_puts_methods_side_by_side_and_joins_each_task(tmp_path):
    methods = ["metalora", "lora", "multitask"]
    results = _rows(methods, [12], tasks=4)
    fig = few_shot_figure(_summary(results), tmp_path / "f.png", results=results)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [METHOD_LABELS[m] for m in ["lora", "multitask", "metalora"]]
    task_lines = [line for line in ax.get_lines() if line.get_label() != "one task" and len(line.get_xdata()) == 3]
    # One line per task through its three scores, in the axis order (lora, multitask, metalora).
    assert sorted(tuple(line.get_ydata()) for line in task_lines) == [
        ((t + 1) / 10, (t + 2) / 10, t / 10) for t in range(4)
    ]
    assert "12 shots" in ax.get_xlabel()
    assert (tmp_path / "f.png").stat().st_size > 0
    # Older result tables have no setting column: they are held-out results.
    older = results.drop(columns="setting")
    fig = few_shot_figure(_summary(results).drop(columns="setting"), tmp_path / "g.png", results=older)
    assert len([line for line in fig.axes[0].get_lines() if len(line.get_xdata()) == 3]) == 4


def test_several_shot_counts_draw_a_curve_per_method_and_the_floor_dashed(tmp_path):
    results = _rows(["lora", "metalora", "constant"], [0, 5, 10], tasks=3)
    fig = few_shot_figure(_summary(results), tmp_path / "f.png", results=results)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("shots")
    assert {text.get_text() for text in ax.get_legend().get_texts()} == {
        METHOD_LABELS["lora"],
        METHOD_LABELS["metalora"],
        METHOD_LABELS["constant"],
    }
    styles = {curve.get_label(): curve.lines[0].get_linestyle() for curve in ax.containers}
    assert styles[METHOD_LABELS["constant"]] == "--" and styles[METHOD_LABELS["metalora"]] == "-"


def test_comparison_training_curves_draw_every_compared_run(tmp_path):
    runs = []
    for method, losses in (("multitask", [3.0, 2.0, 1.5]), ("metalora", [2.5, 1.8, 1.2])):
        run = tmp_path / method
        run.mkdir()
        lines = [json.dumps({"step": i, "stage2/meta_loss": v}) for i, v in enumerate(losses)]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        runs.append({"method": method, "train_seed": 0, "run_dir": str(run)})
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    assert comparison_training_curves(eval_dir, tmp_path / "t.png") is None
    pd.DataFrame(runs).to_csv(eval_dir / "efficiency.csv", index=False)
    fig = comparison_training_curves(eval_dir, tmp_path / "t.png")
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    assert lines[f"{METHOD_LABELS['multitask']}: per step"] == [3.0, 2.0, 1.5]
    assert lines[f"{METHOD_LABELS['metalora']}: per step"] == [2.5, 1.8, 1.2]
    assert len(fig.axes) == 1  # no adaptation gap logged, so no second panel


def test_per_task_panels_keep_column_labels_clear_of_the_next_title(tmp_path):
    methods = ["base", "lora", "multitask", "multitask_full", "metalora"]
    held_out, seen = _rows(methods, [0, 50], tasks=4), _rows(methods, [0, 50], tasks=11).assign(setting="seen")
    fig = per_task_figure(per_task(pd.concat([held_out, seen])), tmp_path / "p.png")
    # The saved figure is closed; a fresh Agg canvas lays it out again as it was saved.
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    upper, lower = fig.axes
    labels_bottom = min(t.get_window_extent(renderer).y0 for t in upper.get_xticklabels())
    assert labels_bottom > lower.title.get_window_extent(renderer).y1
    assert len(upper.get_xticklabels()) == len(methods) * 2


def test_drawing_a_figure_leaves_the_callers_matplotlib_style_alone(tmp_path):
    import matplotlib

    with matplotlib.rc_context({"axes.facecolor": "#123456", "axes.grid": False, "font.size": 13.0}):
        results = _rows(["metalora", "lora"], [0, 4], tasks=3)
        fig = few_shot_figure(_summary(results), tmp_path / "f.png", results=results)
        assert fig.axes[0].get_facecolor()[:3] == (1.0, 1.0, 1.0), "the figure itself is drawn in its own style"
        after = {k: matplotlib.rcParams[k] for k in ("axes.facecolor", "axes.grid", "font.size")}
    assert after == {"axes.facecolor": "#123456", "axes.grid": False, "font.size": 13.0}
