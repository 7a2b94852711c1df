"""Every answer behind a score: per-item predictions of each scored point, and views of them for reading.

A scored point keeps, per test item, the example's id, the prompt as the model saw it, the target, the model's
answer (generated text, or the chosen option with every option's log-likelihood), whether it counted as correct,
and the item's loss when the test loss is taken. `metalora eval` writes them beside the tables as
`eval/samples.parquet`, one row per (point, item); `load_samples` reads them into a DataFrame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

SAMPLES_FILE = "samples.parquet"
# The columns naming the point an item was scored in (the point key of `fewshot.PointKey`, in its order).
POINT_COLUMNS = ["setting", "method", "train_seed", "task", "n_shots", "seed"]


@dataclass
class ItemAnswer:
    """One test item as one point scored it."""

    # Position in the point's scored test set.
    item: int
    example_id: str
    prompt: str
    target: str
    # The generated text (first line counts), or the chosen option.
    answer: str
    correct: bool
    # Log-likelihood of each of the task's options, in the task's order; empty for generation.
    option_scores: list[float]
    # Mean cross-entropy over the item's target tokens; NaN when the test loss is not taken.
    loss: float


def answer_rows(point: dict[str, object], answers: list[ItemAnswer]) -> list[dict[str, object]]:
    """The items of one point as flat rows: the point's columns (`POINT_COLUMNS`) then the item's fields."""
    return [{**{column: point[column] for column in POINT_COLUMNS}, **asdict(answer)} for answer in answers]


def load_samples(path: str | Path) -> pd.DataFrame:
    """The per-item answers of an evaluation, given its run directory or its `eval/` directory.

    Raises:
        FileNotFoundError: no samples there (the evaluation ran with `eval.samples=false`, or has not run).
    """
    path = Path(path)
    for candidate in (path / SAMPLES_FILE, path / "eval" / SAMPLES_FILE, path):
        if candidate.is_file():
            return pd.read_parquet(candidate)
    raise FileNotFoundError(
        f"{path}: no {SAMPLES_FILE} (run `metalora eval` with eval.samples=true, the default, to write it)"
    )


def shown_point(samples: pd.DataFrame) -> pd.DataFrame:
    """The items of one comparable point per method and task: the most shots below the full-data reference,
    evaluation seed 0 and each method's first training seed, so every method answers the same items."""
    few_shot = samples[samples["n_shots"] >= 0]
    if few_shot.empty:
        return few_shot
    shots = few_shot.groupby(["setting", "task"])["n_shots"].transform("max")
    first_seed = few_shot.groupby("method")["train_seed"].transform("min")
    return few_shot[(few_shot["n_shots"] == shots) & (few_shot["seed"] == 0) & (few_shot["train_seed"] == first_seed)]


def disagreements(samples: pd.DataFrame, per_task: int = 3) -> pd.DataFrame:
    """Per task, up to `per_task` items where the methods disagree (one right, another wrong), side by side: one
    row per item with its target, then each method's answer marked right or wrong (at `shown_point`'s point)."""
    shown = shown_point(samples[samples["method"] != "constant"])
    if shown.empty:
        return pd.DataFrame(columns=["setting", "task", "n_shots", "example_id", "target"])
    keys = ["setting", "task", "n_shots", "example_id", "target"]
    marked = shown.assign(answer=shown["answer"].str.split("\n").str[0].str.strip()
                          + shown["correct"].map({True: " (right)", False: " (wrong)"}))  # fmt: skip
    answers = marked.pivot_table(index=keys, columns="method", values="answer", aggfunc="first")
    right = shown.pivot_table(index=keys, columns="method", values="correct", aggfunc="first")
    split = right[(right.fillna(False).astype(bool).any(axis=1)) & (~right.fillna(True).astype(bool).all(axis=1))]
    chosen = split.groupby(level=["setting", "task"], group_keys=False).head(per_task)
    return answers.loc[chosen.index].reset_index()


def wrong_answer_table(samples: pd.DataFrame, width: int = 30) -> pd.DataFrame:
    """One row per task, one column per method: its most common wrong answer (first line, cut to `width`
    characters) with how many of its wrong answers on that task it makes up."""
    common = common_wrong_answers(samples, top=1)
    if common.empty:
        return pd.DataFrame(columns=["setting", "task"])
    cut = common["answer"].map(lambda a: repr(a if len(a) <= width else a[: width - 1] + "…"))
    common = common.assign(cell=cut + " x" + common["count"].astype(str))
    return common.pivot_table(index=["setting", "task"], columns="method", values="cell", aggfunc="first").reset_index()


def common_wrong_answers(samples: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """Per task and method, the `top` most frequent wrong answers (first line) over all its points, with how often
    each was given and the share of the method's wrong answers on that task it makes up."""
    wrong = samples[~samples["correct"].astype(bool)]
    if wrong.empty:
        return pd.DataFrame(columns=["setting", "task", "method", "answer", "count", "share of wrong"])
    first_lines = wrong.assign(answer=wrong["answer"].str.split("\n").str[0].str.strip())
    counts = first_lines.groupby(["setting", "task", "method", "answer"]).size().rename("count").reset_index()
    per_method = ["setting", "task", "method"]
    counts["share of wrong"] = counts["count"] / counts.groupby(per_method)["count"].transform("sum")
    ranked = counts.sort_values([*per_method, "count", "answer"], ascending=[True, True, True, False, True])
    return ranked.groupby(per_method).head(top).reset_index(drop=True)
