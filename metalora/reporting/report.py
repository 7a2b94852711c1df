"""`metalora report <run or sweep dir>`: a Markdown (and optionally HTML) report from result files.

A run report shows the config, the training curves, the few-shot summary, the significance and
efficiency tables, the figures and, from the per-item answers, items the methods disagree on and the most common
wrong answers; a sweep report shows the points, the aggregated summary and the
sweep figures. Everything is read from files the kit wrote; nothing is recomputed.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from metalora.errors import MetaloraError
from metalora.evaluation.samples import SAMPLES_FILE, disagreements, load_samples, wrong_answer_table
from metalora.evaluation.stats import describe_comparison, summarise
from metalora.io import atomic_write_text
from metalora.reporting.efficiency import read_metrics
from metalora.reporting.plots import METHOD_LABELS, comparison_training_curves, training_curves


class ReportError(MetaloraError):
    """The directory is neither a run nor a sweep."""


def _table(path: Path, digits: int = 4) -> str:
    frame = pd.read_csv(path)
    if frame.empty:
        return "_(empty)_\n"
    return frame.to_markdown(index=False, floatfmt=f".{digits}g") + "\n"


def _figure(md_dir: Path, path: Path, caption: str) -> str:
    return f"![{caption}]({path.relative_to(md_dir).as_posix()})\n" if path.is_file() else ""


def comparison_sentences(eval_dir: str | Path) -> list[str]:
    """One plain sentence per row of an eval directory's significance.csv (empty when there is none)."""
    path = Path(eval_dir) / "significance.csv"
    if not path.is_file():
        return []
    return [describe_comparison(row, METHOD_LABELS) for _, row in pd.read_csv(path).iterrows()]


def _check_eval_tables(eval_dir: Path) -> None:
    """Refuse to report from damaged tables: each of an eval directory's tables present, and its summary the one its
    results give (a truncated or edited results.csv no longer does).

    Raises:
        ReportError: naming the missing, unreadable or disagreeing table.
    """
    if not eval_dir.is_dir():
        return
    for name in ("results.csv", "summary.csv", "significance.csv"):
        if not (eval_dir / name).is_file():
            raise ReportError(f"{eval_dir / name}: missing; rerun `metalora eval` to write the tables whole")
    try:
        results, summary = pd.read_csv(eval_dir / "results.csv"), pd.read_csv(eval_dir / "summary.csv")
        recomputed = summarise(results)
        key = ["setting", "method", "n_shots", "n_rows"]
        agree = recomputed[key].astype(str).values.tolist() == summary[key].astype(str).values.tolist()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, ValueError) as err:
        raise ReportError(f"{eval_dir}: cannot read its tables ({err}); rerun `metalora eval`") from err
    if not agree:
        raise ReportError(f"{eval_dir}: summary.csv does not match results.csv (a truncated or edited table?): "
                          "rerun `metalora eval`, or recompute the tables from results.csv")  # fmt: skip


def run_report(run_dir: Path) -> str:
    """Markdown for a run directory (config.yaml, metrics.jsonl, eval/): the comparisons in plain sentences
    first, then the figures, then the tables."""
    _check_eval_tables(run_dir / "eval")
    parts = [f"# Run report: `{run_dir.name}`\n"]
    sentences = comparison_sentences(run_dir / "eval")
    if sentences:
        parts.append("## What the comparison shows\n\n" + "\n".join(f"- {s}" for s in sentences) + "\n")
    # The curves of every run the evaluation compared, or this run's own when nothing was compared.
    curves = comparison_training_curves(run_dir / "eval", run_dir / "training.png")
    if curves is None:
        metrics = read_metrics(run_dir)
        if not metrics.empty:
            curves = training_curves(metrics, run_dir / "training.png", title=f"Training curves: {run_dir.name}")
    # A training.png left by an earlier report is not shown when no curves were drawn now.
    figures = [("eval/few_shot.png", "scores by method and shots"), ("eval/per_task.png", "score per task"),
               *([("training.png", "training curves")] if curves is not None else []),
               ("eval/efficiency.png", "efficiency")]  # fmt: skip
    for name, caption in figures:
        figure = _figure(run_dir, run_dir / name, caption)
        if figure:
            parts.append(f"## Figure: {caption}\n\n{figure}")
    eval_dir = run_dir / "eval"
    sections = [
        ("Scores (mean and 95 % CI over tasks and training seeds; n_shots -1 = whole adaptation pool)",
         "summary.csv"),
        ("Paired differences against the reference (tasks are the unit; Holm-adjusted across shot counts)",
         "significance.csv"),
        ("Efficiency (measured during training)", "efficiency.csv"),
    ]  # fmt: skip
    for title, name in sections:
        if (eval_dir / name).is_file():
            parts.append(f"## {title}\n\n" + _table(eval_dir / name))
    if (eval_dir / SAMPLES_FILE).is_file():
        parts.append(answers_section(load_samples(eval_dir)))
    summary_json = run_dir / "summary.json"
    if summary_json.is_file():
        parts.append(f"## Training summary\n\n```json\n{summary_json.read_text().strip()}\n```\n")
    config = run_dir / "config.yaml"
    if config.is_file():
        parts.append(f"## Config\n\n```yaml\n{config.read_text().strip()}\n```\n")
    return "\n".join(parts)


def answers_section(samples: pd.DataFrame, per_task: int = 3, width: int = 40) -> str:
    """The answers behind the scores: items where the methods disagree, side by side, and each method's most
    common wrong answer per task (`eval/samples.parquet` holds every answer; `metalora.load_samples` reads it)."""
    parts = ["## Answers\n"]
    disagree = disagreements(samples, per_task)
    if disagree.empty:
        parts.append("The methods got the same items right at the shot count shown.\n")
    else:
        shots = ", ".join(sorted({str(n) for n in disagree["n_shots"]}))
        cells = disagree.drop(columns=["n_shots"]).map(lambda v: v if not isinstance(v, str) or len(v) <= width
                                                       else v[: width - 1] + "…")  # fmt: skip
        parts.append(f"Items where one method is right and another wrong ({shots} shots, evaluation seed 0, first "
                     f"training seed; up to {per_task} per task):\n\n" + cells.to_markdown(index=False) + "\n")
    wrong = wrong_answer_table(samples)
    if not wrong.empty:
        parts.append("The most common wrong answer per task and method, with how often it was given (all points):\n\n"
                     + wrong.to_markdown(index=False) + "\n")  # fmt: skip
    return "\n".join(parts)


def sweep_report(root: Path) -> str:
    """Markdown for a sweep directory (sweep.yaml, points.csv, summary.csv, figures)."""
    parts = [f"# Sweep report: `{root.name}`\n", f"```yaml\n{(root / 'sweep.yaml').read_text().strip()}\n```\n"]
    if (root / "points.csv").is_file():
        points = pd.read_csv(root / "points.csv").fillna("")
        parts.append("## Points\n\n" + points.to_markdown(index=False) + "\n")
    if (root / "summary.csv").is_file():
        parts.append("## Summary (each point's own trained method)\n\n" + _table(root / "summary.csv"))
    for name in ("sweep.png", "sweep_heatmap.png"):
        parts.append(_figure(root, root / name, name.removesuffix(".png").replace("_", " ")))
    return "\n".join(p for p in parts if p)


def write_report(directory: str | Path, html: bool = False) -> Path:
    """Write report.md (and report.html when asked) into a run or sweep directory.

    Args:
        directory: a run directory (holds config.yaml) or a sweep directory (holds sweep.yaml).
        html: also write report.html.

    Returns:
        The Markdown file.

    Raises:
        ReportError: the directory holds neither.
    """
    directory = Path(directory)
    if (directory / "sweep.yaml").is_file():
        text = sweep_report(directory)
    elif (directory / "config.yaml").is_file():
        text = run_report(directory)
    else:
        raise ReportError(f"{directory}: neither a run directory (config.yaml) nor a sweep directory (sweep.yaml)")
    path = directory / "report.md"
    atomic_write_text(path, text)
    if html:
        import mistune

        body = mistune.create_markdown(plugins=["table"])(text)
        atomic_write_text(directory / "report.html", f"<!doctype html><meta charset='utf-8'>\n{body}")
    return path
