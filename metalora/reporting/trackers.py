"""The evaluation in the experiment trackers that hold the training curves (`train.log_with`, through accelerate).

Training records which tracker run it logged to (`training/tracker_runs.py`); the evaluation opens the same runs
again through accelerate's tracker classes and adds, per setting, method and shot count, the mean and its 95 %
interval, the significance table and the figures. A run that logged to no tracker gets a fresh tracker run under its
name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker
from PIL import Image

from metalora.training.budgets import FULL_DATA_SHOTS
from metalora.training.tracker_runs import reopen_kwargs

FIGURES = ("few_shot", "per_task", "efficiency")
TABLES = ("summary", "significance")


def evaluation_scalars(summary: pd.DataFrame) -> dict[str, float]:
    """summary.csv as tracker scalars: `eval/<setting>/<method>/shots_<n>/<mean|ci_low|ci_high>` (`shots_full` for
    the full-data reference); a point with no finite score is left out."""
    scalars = {}
    for row in summary.itertuples(index=False):
        shots = "full" if row.n_shots == FULL_DATA_SHOTS else str(row.n_shots)
        for column in ("mean", "ci_low", "ci_high"):
            value = float(getattr(row, column))
            if np.isfinite(value):
                scalars[f"eval/{row.setting}/{row.method}/shots_{shots}/{column}"] = value
    return scalars


def start_trackers(log_with: list[str], run_name: str, run_dir: Path) -> list[GeneralTracker]:
    """Start accelerate's trackers `log_with` on the runs `run_dir` recorded, as `Accelerator.init_trackers` would."""
    kwargs = reopen_kwargs(run_dir)
    trackers = []
    for name in log_with:
        tracker_class = LOGGER_TYPE_TO_CLASS[name]
        if tracker_class.requires_logging_directory:
            tracker = tracker_class(run_name, str(run_dir), **kwargs.get(name, {}))
        else:
            tracker = tracker_class(run_name, **kwargs.get(name, {}))
        tracker.start()
        trackers.append(tracker)
    return trackers


def log_evaluation(log_with: list[str], run_name: str, run_dir: Path, eval_dir: Path, step: int) -> None:
    """Log the evaluation in `eval_dir` to each tracker of `log_with`, under the run `run_dir` recorded, at `step`
    (the training's last step, so the values sit at the end of its curves)."""
    summary = pd.read_csv(eval_dir / "summary.csv")
    tables = {name: pd.read_csv(eval_dir / f"{name}.csv") for name in TABLES if (eval_dir / f"{name}.csv").is_file()}
    figures = {name: eval_dir / f"{name}.png" for name in FIGURES if (eval_dir / f"{name}.png").is_file()}
    for tracker in start_trackers(log_with, run_name, run_dir):
        tracker.log(evaluation_scalars(summary), step=step)
        if tracker.name == "mlflow":
            # MLflow keeps files as the run's artifacts: the tables and figures themselves.
            for path in [*(eval_dir / f"{name}.csv" for name in tables), *figures.values()]:
                tracker.log_artifact(str(path), "eval")
        else:
            _log_tables_and_figures(tracker, tables, figures, step)
        tracker.finish()


def _log_tables_and_figures(
    tracker: GeneralTracker, tables: dict[str, pd.DataFrame], figures: dict[str, Path], step: int
) -> None:
    # wandb has tables and images; TensorBoard has images and text, where a table goes as Markdown.
    for name, table in tables.items():
        if hasattr(tracker, "log_table"):
            tracker.log_table(f"eval/{name}", dataframe=table, step=step)
        else:
            tracker.log({f"eval/{name}": table.to_markdown(index=False)}, step=step)
    for name, path in figures.items():
        image = np.asarray(Image.open(path).convert("RGB"))
        if tracker.name == "tensorboard":
            tracker.log_images({f"eval/{name}": image[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({f"eval/{name}": [image]}, step=step)
