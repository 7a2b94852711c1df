"""The kit's figures (seaborn), each saved as PNG and returned for display in a notebook."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

# No backend is chosen here: matplotlib falls back to Agg where there is no display, and Jupyter keeps
# its inline backend, so the user's own plots and the returned figures render there.
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from metalora.io import atomic_write_bytes
from metalora.reporting.efficiency import read_metrics
from metalora.training.budgets import FULL_DATA_SHOTS

METHOD_LABELS = {
    "base": "base model (no adapter)",
    "lora": "standard LoRA (fresh init)",
    "multitask": "multi-task LoRA",
    "multitask_full": "multi-task LoRA, full data",
    "metalora": "MeTA-LoRA",
    "reptile": "Reptile LoRA",
    "fomaml": "FOMAML (full weights)",
    "full_data": "full-data LoRA (whole pool)",
    "constant": "best constant answer",
}


def _styled(style: str) -> Callable:
    """Draw a figure in a seaborn style for that figure only: the caller's global matplotlib settings stay theirs."""

    def wrap(draw: Callable) -> Callable:
        @functools.wraps(draw)
        def styled(*args: Any, **kwargs: Any) -> Any:
            with sns.axes_style(style):
                return draw(*args, **kwargs)

        return styled

    return wrap


PALETTE = dict(zip(METHOD_LABELS, sns.color_palette("tab10", len(METHOD_LABELS)), strict=True))


def _method_order(methods: pd.Series) -> list[str]:
    known = [m for m in METHOD_LABELS if m in set(methods)]
    return known + sorted(set(methods) - set(known))


def _save(fig: plt.Figure, path: str | Path) -> plt.Figure:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    # Closed so that Jupyter does not show it a second time at the end of the cell; display(fig) still works.
    plt.close(fig)
    return fig


@_styled("whitegrid")
def few_shot_figure(
    summary: pd.DataFrame,
    path: str | Path,
    title: str = "Few-shot adaptation",
    results: pd.DataFrame | None = None,
):
    """Score vs shots per method with 95 % CI bands, one panel per setting (held-out tasks, seen tasks).

    The full-data reference is a dashed line. With `results`, each training seed of a method trained
    several times is drawn as a thin line of the method's colour (its mean over tasks): the spread
    between training runs. With a single shot count there is no curve to draw: the methods stand side by
    side instead, and with `results` each task's scores are joined across them (the pairs the
    significance tests compare).
    """
    if "setting" not in summary:
        summary = summary.assign(setting="heldout")
    settings = sorted(summary["setting"].unique())
    fig, axes = plt.subplots(1, len(settings), figsize=(7 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        rows = summary[summary["setting"] == setting]
        if rows.loc[rows["n_shots"] != FULL_DATA_SHOTS, "n_shots"].nunique() == 1:
            _methods_panel(ax, rows, _task_scores(results, setting))
        else:
            _few_shot_panel(ax, rows, _seed_curves(results, setting))
        ax.set_title(f"{title}: {SETTING_LABELS.get(setting, setting)}")
    return _save(fig, path)


SETTING_LABELS = {"heldout": "held-out tasks", "seen": "training tasks' own test sets"}


@_styled("white")
def per_task_figure(table: pd.DataFrame, path: str | Path, title: str = "Score per task"):
    """One heatmap per setting: a row per task (a language, in a multilingual suite), a column per method and
    shot count, each cell the task's mean score (`evaluation.stats.per_task`)."""
    settings = sorted(table["setting"].unique())
    heights = [table.loc[table["setting"] == s, "task"].nunique() for s in settings]
    # Constrained layout keeps each panel's rotated column labels clear of the next panel's title; every
    # panel gets room for those labels on top of its rows.
    fig, axes = plt.subplots(
        len(settings), 1, figsize=(10, 1.2 + 0.35 * sum(heights) + 2.2 * len(settings)), squeeze=False,
        gridspec_kw={"height_ratios": heights}, layout="constrained",
    )  # fmt: skip
    for ax, setting in zip(axes[:, 0], settings, strict=True):
        rows = table[table["setting"] == setting]
        order = [(m, n) for m in _method_order(rows["method"]) for n in sorted(rows["n_shots"].unique())]
        grid = rows.pivot_table(index="task", columns=["method", "n_shots"], values="mean")
        grid = grid[[c for c in order if c in grid.columns]]
        grid.columns = [f"{METHOD_LABELS.get(m, m)}\n{'full pool' if n == FULL_DATA_SHOTS else f'{n} shots'}"
                        for m, n in grid.columns]  # fmt: skip
        sns.heatmap(grid, ax=ax, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", cbar=False,
                    annot_kws={"size": 7})  # fmt: skip
        ax.set_title(f"{title}: {SETTING_LABELS.get(setting, setting)}")
        ax.set_xlabel("")
        ax.set_ylabel("task")
        ax.tick_params(axis="x", labelsize=7)
    return _save(fig, path)


def _in_setting(results: pd.DataFrame, setting: str) -> pd.DataFrame:
    # Result tables from before the seen scenario have no setting column: all their rows are held-out results.
    return results[results["setting"] == setting] if "setting" in results else results


def _seed_curves(results: pd.DataFrame | None, setting: str) -> pd.DataFrame:
    """Mean score per method x training seed x shots, for methods with several training seeds."""
    if results is None or "train_seed" not in results:
        return pd.DataFrame(columns=["method", "train_seed", "n_shots", "value"])
    rows = _in_setting(results, setting)
    means = rows.groupby(["method", "train_seed", "n_shots"], as_index=False)["value"].mean()
    replicated = means.groupby("method")["train_seed"].transform("nunique") > 1
    return means[replicated]


def _task_scores(results: pd.DataFrame | None, setting: str) -> pd.DataFrame:
    """Mean score per task (a column) and method (a row), over evaluation and training seeds."""
    if results is None:
        return pd.DataFrame()
    return _in_setting(results, setting).pivot_table(index="method", columns="task", values="value", aggfunc="mean")


def _methods_panel(ax: plt.Axes, summary: pd.DataFrame, task_scores: pd.DataFrame) -> None:
    order = _method_order(summary["method"])
    places = range(len(order))
    for task in task_scores.columns:
        scores = task_scores[task].reindex(order)
        ax.plot(places, scores, color="grey", alpha=0.35, linewidth=0.8, marker=".", markersize=4)
    for place, method in zip(places, order, strict=True):
        row = summary[summary["method"] == method].iloc[0]
        ax.errorbar([place], [row["mean"]], yerr=[[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]],
                    marker="s", markersize=8, capsize=6, linewidth=2, color=PALETTE.get(method))  # fmt: skip
    ax.set_xticks(list(places), [METHOD_LABELS.get(m, m) for m in order], rotation=15, fontsize=8)
    shots = summary.loc[summary["n_shots"] != FULL_DATA_SHOTS, "n_shots"].iloc[0]
    ax.set_xlabel(f"after adaptation on {shots} shots" if shots else "without adaptation (0 shots)")
    ax.set_ylabel("score (accuracy / exact match)\nmean and 95 % CI over tasks")
    if not task_scores.empty:
        ax.plot([], [], color="grey", alpha=0.5, linewidth=0.8, marker=".", label="one task")
        ax.legend(fontsize=8, loc="best")


def _few_shot_panel(ax: plt.Axes, summary: pd.DataFrame, seed_curves: pd.DataFrame) -> None:
    curves = summary[summary["n_shots"] != FULL_DATA_SHOTS]
    for method in _method_order(curves["method"]):
        rows = curves[curves["method"] == method].sort_values("n_shots")
        label = METHOD_LABELS.get(method, method)
        marker = "s" if len(rows) == 1 else "o"
        color = PALETTE.get(method)
        # The best constant answer is a floor, not a learner: a dashed line without markers.
        floor = method == "constant"
        ax.errorbar(rows["n_shots"], rows["mean"], yerr=[rows["mean"] - rows["ci_low"], rows["ci_high"] - rows["mean"]],
                    marker=None if floor else marker, linestyle="--" if floor else "-", label=label, color=color,
                    capsize=3)  # fmt: skip
        ax.fill_between(rows["n_shots"], rows["ci_low"], rows["ci_high"], alpha=0.12, color=color)
        for _, seed_rows in seed_curves[seed_curves["method"] == method].groupby("train_seed"):
            seed_rows = seed_rows[seed_rows["n_shots"] != FULL_DATA_SHOTS].sort_values("n_shots")
            ax.plot(seed_rows["n_shots"], seed_rows["value"], color=color, linewidth=0.8, alpha=0.6, linestyle=":")
    for _, row in summary[summary["n_shots"] == FULL_DATA_SHOTS].iterrows():
        color = PALETTE.get(row["method"])
        ax.axhline(row["mean"], linestyle="--", color=color, label=METHOD_LABELS.get(row["method"], row["method"]))
        ax.axhspan(row["ci_low"], row["ci_high"], alpha=0.08, color=color)
    ax.set_xlabel("shots (examples of the task used for adaptation)")
    ax.set_ylabel("score (accuracy / exact match)\nmean and 95 % CI over tasks (and training seeds)")
    if not seed_curves.empty:
        ax.plot([], [], color="grey", linewidth=0.8, linestyle=":", label="one training seed (mean over tasks)")
    ax.legend(fontsize=8, loc="best")


@_styled("whitegrid")
def efficiency_figure(efficiency: pd.DataFrame, path: str | Path):
    """Bars per trained method: seconds per step, tokens/s, peak memory and final weights on disk.

    Args:
        efficiency: efficiency.csv rows.

    Returns:
        The figure.
    """
    panels = [
        ("time_per_step_s", "seconds per step (median)", False),
        ("tokens_per_s", "tokens per second (median)", False),
        ("peak_memory_mb", "peak memory (MB)", False),
        ("final_weights_bytes", "final weights on disk (bytes, log)", True),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), layout="constrained")
    labels = [METHOD_LABELS.get(m, m) for m in efficiency["method"]]
    colors = [PALETTE.get(m, "grey") for m in efficiency["method"]]
    for ax, (column, title, log) in zip(axes, panels, strict=True):
        sns.barplot(x=labels, y=efficiency[column].astype(float), hue=labels, palette=colors, ax=ax, legend=False)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        if log:
            ax.set_yscale("log")
    fig.suptitle("Training efficiency (measured)")
    return _save(fig, path)


@_styled("whitegrid")
def training_curves(metrics: pd.DataFrame | dict[str, pd.DataFrame], path: str | Path, title: str = "Meta-training",
                    colors: dict[str, object] | None = None):  # fmt: skip
    """Training loss per step and, where logged, the adaptation gap, for one run or several side by side.

    Args:
        metrics: a run's metrics.jsonl rows, or such rows per label (e.g. per method of a comparison).
        colors: a colour per label; labels without one take seaborn's palette in order.

    Returns:
        The figure.
    """
    runs = metrics if isinstance(metrics, dict) else {"": metrics}
    # The gap is absent from runs with meta.measure_gap=false.
    panels = [(column, label) for column, label in (("stage2/meta_loss", LOSS_LABEL),
                                                    ("adaptation_gap", "query loss - support loss"))
              if any(column in frame.columns for frame in runs.values())]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (column, label) in zip(axes[0], panels, strict=True):
        for (run, frame), fallback in zip(runs.items(), sns.color_palette("tab10", len(runs)), strict=True):
            color = (colors or {}).get(run, fallback)
            if column not in frame.columns:
                continue
            # Each step sees a few sampled tasks, so the raw curve is noisy; the rolling mean shows the trend.
            window = min(50, max(1, len(frame) // 5))
            name = f"{run}: " if run else ""
            ax.plot(frame["step"], frame[column], alpha=0.3, color=color, label=f"{name}per step")
            smooth = frame[column].rolling(window, min_periods=1).mean()
            ax.plot(frame["step"], smooth, linewidth=2, color=color, label=f"{name}rolling mean ({window} steps)")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    return _save(fig, path)


# Meta-learners log the query loss after adaptation; the multi-task baselines, which do not adapt, their
# training batch's loss under the same name.
LOSS_LABEL = "training loss per step\n(meta-learners: query loss after adaptation)"


def comparison_training_curves(eval_dir: str | Path, path: str | Path) -> plt.Figure | None:
    """The training curves of every run an evaluation compared (its efficiency.csv), one colour per run.

    Returns:
        The figure, or None when the evaluation compared no trained run.
    """
    table = Path(eval_dir) / "efficiency.csv"
    if not table.is_file():
        return None
    runs = pd.read_csv(table)
    several_seeds = runs["train_seed"].nunique() > 1
    curves, colors = {}, {}
    for _, run in runs.iterrows():
        label = METHOD_LABELS.get(run["method"], run["method"])
        label = f"{label}, seed {run['train_seed']}" if several_seeds else label
        metrics = read_metrics(run["run_dir"])
        if not metrics.empty:
            curves[label] = metrics
            colors[label] = PALETTE.get(run["method"])
    return training_curves(curves, path, title="Training curves", colors=colors) if curves else None


@_styled("whitegrid")
def sweep_figure(summary: pd.DataFrame, key: str, path: str | Path, title: str = "Sweep"):
    """Score vs one swept value, a line (with 95 % CI band) per shot count.

    Args:
        summary: a sweep's summary.csv rows (key, n_shots, mean, ci_low, ci_high).
        key: the swept config key (x axis).

    Returns:
        The figure.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    numeric = pd.api.types.is_numeric_dtype(summary[key]) and not pd.api.types.is_bool_dtype(summary[key])
    positions = summary[key] if numeric else summary[key].astype(str)
    colors = sns.color_palette("viridis", summary["n_shots"].nunique())
    for color, (shots, rows) in zip(colors, summary.assign(_x=positions).groupby("n_shots"), strict=True):
        rows = rows.sort_values("_x") if numeric else rows
        ax.errorbar(rows["_x"], rows["mean"], yerr=[rows["mean"] - rows["ci_low"], rows["ci_high"] - rows["mean"]],
                    marker="o", capsize=3, color=color, label=f"{shots} shots")  # fmt: skip
        ax.fill_between(rows["_x"], rows["ci_low"], rows["ci_high"], alpha=0.12, color=color)
    if numeric and summary[key].min() > 0 and summary[key].max() / summary[key].min() >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(key)
    ax.set_ylabel("score after adaptation\nmean and 95 % CI over tasks x seeds")
    ax.set_title(title)
    ax.legend(fontsize=8, title="held-out shots")
    return _save(fig, path)


@_styled("white")
def sweep_heatmap(summary: pd.DataFrame, rows_key: str, columns_key: str, path: str | Path, title: str = "Sweep"):
    """Mean score over a 2-D sweep at its largest shot count.

    Args:
        summary: a sweep's summary.csv rows.
        rows_key: the config key on the rows.
        columns_key: the config key on the columns.

    Returns:
        The figure.
    """
    shots = summary["n_shots"].max()
    table = summary[summary["n_shots"] == shots].pivot_table(index=rows_key, columns=columns_key, values="mean")
    fig, ax = plt.subplots(figsize=(1.6 * table.shape[1] + 3, 0.8 * table.shape[0] + 2))
    sns.heatmap(table, annot=True, fmt=".3f", cmap="viridis", ax=ax, cbar_kws={"label": f"mean score at {shots} shots"})
    ax.set_title(title)
    return _save(fig, path)
