"""Summary statistics and significance tests over few-shot results, with the task as the unit of inference.

Rows of a result table are repeated measures: several evaluation seeds (different shots, same test
set) and several training seeds (independently trained initialisations) per task. Treating them as
independent would shrink every interval, so each (task, training seed) cell is first averaged over its
evaluation seeds, and the cells form a tasks x training-seeds grid with crossed random effects: a task
is easy or hard for every run, a training run is lucky or unlucky on every task. The variance of the
grid's mean is estimated from the two-way ANOVA mean squares,

    Var(mean) = s_task^2 / T + s_seed^2 / S + s_resid^2 / (T S) = (MS_task + MS_seed - MS_resid) / (T S),

with Satterthwaite's degrees of freedom, so an interval widens when training seeds disagree and reduces
to the Student-t interval over task means when there is one training seed. Paired comparisons take the
same route on per-cell differences (method minus reference); their p-values are Holm-adjusted across
the shot counts of a comparison.

With one training run per trained method the grid has one column: its interval and p-value cover task-to-task
and evaluation noise, not how a second training run would have come out. Every comparison row says so
(`run_variation_included`) and its sentence carries the qualifier. No signed-rank test over task means is
reported: over task means it ignores the training-run level, and once training runs vary it rejects true
nulls far more often than its level (tests/test_stats.py simulates it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from metalora.config import TRAINED_METHODS

CONFIDENCE = 0.95
POWER = 0.80
# Training seeds of a method trained once, and of the untrained methods (base, lora, full_data).
SINGLE_TRAINING_SEED = -1
SUMMARY_COLUMNS = [
    "setting", "method", "n_shots", "mean", "ci_low", "ci_high", "n_tasks", "n_train_seeds", "n_rows", "n_nonfinite",
]  # fmt: skip
SIGNIFICANCE_COLUMNS = [
    "setting", "method", "reference", "n_shots", "n_tasks", "n_train_seeds", "mean_diff", "ci_low", "ci_high",
    "effect_size_dz", "p_value", "p_holm", "detectable_diff_80", "run_variation_included",
]  # fmt: skip
# Every metric the kit scores is a rate in [0, 1]: intervals of means stay in it, of differences in [-1, 1].
BOUNDED_METRICS = ("exact_match", "accuracy")
ONE_RUN_QUALIFIER = "one training run per method: run-to-run variation not included"


@dataclass
class GridEstimate:
    """Mean of a tasks x training-seeds grid with its standard error and degrees of freedom."""

    mean: float
    standard_error: float
    dof: float
    n_tasks: int
    n_train_seeds: int

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        """The Student-t interval; both ends equal the mean when the spread is zero or unknown."""
        if not np.isfinite(self.dof) or self.standard_error == 0.0:
            return self.mean, self.mean
        half = stats.t.ppf(0.5 + confidence / 2, self.dof) * self.standard_error
        return self.mean - half, self.mean + half

    def p_value(self) -> float:
        """Two-sided t-test of a zero mean (1.0 without spread and a zero mean; 0.0 without spread otherwise)."""
        if not np.isfinite(self.dof) or self.standard_error == 0.0:
            return 1.0 if self.mean == 0.0 else 0.0
        return float(2 * stats.t.sf(abs(self.mean) / self.standard_error, self.dof))

    def detectable_difference(self, alpha: float = 1 - CONFIDENCE, power: float = POWER) -> float:
        """The smallest true mean this design finds with probability `power` in a two-sided test at `alpha`.

        The usual normal-shift approximation of the t-test's power, (t_{1-alpha/2} + t_{power}) x SE, with the
        standard error this grid showed; nan without spread.
        """
        if not np.isfinite(self.dof) or self.standard_error == 0.0:
            return float("nan")
        return float((stats.t.ppf(1 - alpha / 2, self.dof) + stats.t.ppf(power, self.dof)) * self.standard_error)


def grid_estimate(grid: np.ndarray) -> GridEstimate:
    """Mean and standard error of a complete tasks x training-seeds grid of cell means (crossed effects)."""
    grid = np.asarray(grid, dtype=float)
    n_tasks, n_seeds = grid.shape
    mean = float(grid.mean())
    if n_tasks < 2:
        return GridEstimate(mean, 0.0, float("nan"), n_tasks, n_seeds)
    task_means = grid.mean(axis=1)
    if n_seeds == 1:
        variance = float(task_means.var(ddof=1)) / n_tasks
        return GridEstimate(mean, variance**0.5, float(n_tasks - 1), n_tasks, n_seeds)
    seed_means = grid.mean(axis=0)
    ms_task = n_seeds * float(task_means.var(ddof=1))
    ms_seed = n_tasks * float(seed_means.var(ddof=1))
    residual = grid - task_means[:, None] - seed_means[None, :] + mean
    df_task, df_seed, df_resid = n_tasks - 1, n_seeds - 1, (n_tasks - 1) * (n_seeds - 1)
    ms_resid = float((residual**2).sum()) / df_resid
    # The unbiased combination can fall below what the tasks alone show when the residual is large; the
    # tasks-only variance is then the floor, so a noisy grid never looks more precise than its task means.
    combined = ms_task + ms_seed - ms_resid
    if combined <= ms_task:
        return GridEstimate(mean, (ms_task / (n_tasks * n_seeds)) ** 0.5, float(df_task), n_tasks, n_seeds)
    dof = combined**2 / (ms_task**2 / df_task + ms_seed**2 / df_seed + ms_resid**2 / df_resid)
    return GridEstimate(mean, (combined / (n_tasks * n_seeds)) ** 0.5, float(dof), n_tasks, n_seeds)


def mean_ci(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and Student-t interval of independent `values`; low = high = mean without spread."""
    estimate = grid_estimate(np.asarray(values, dtype=float)[:, None])
    return (estimate.mean, *estimate.interval(confidence))


def holm(p_values: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error control), in the input order."""
    order = np.argsort(p_values)
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def _with_defaults(results: pd.DataFrame) -> pd.DataFrame:
    """Results with the columns older tables lack: one setting, one training seed, every row finite."""
    results = results.copy()
    if "setting" not in results:
        results["setting"] = "heldout"
    if "train_seed" not in results:
        results["train_seed"] = SINGLE_TRAINING_SEED
    if "finite" not in results:
        results["finite"] = np.isfinite(results["value"].astype(float))
    return results


def cell_means(rows: pd.DataFrame) -> pd.DataFrame:
    """One method's rows averaged over evaluation seeds: a tasks x training-seeds grid (NaN where missing)."""
    return rows.groupby(["task", "train_seed"])["value"].mean().unstack("train_seed")


def _complete(grid: pd.DataFrame) -> pd.DataFrame:
    """Drop tasks missing a training seed, so the grid is complete (a task counts only with all its runs)."""
    return grid.dropna(axis=0, how="any")


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95 % CI per setting x method x n_shots, over tasks and training seeds (see the module doc).

    `n_tasks` is the number of independent units behind the interval; `n_rows` counts every scored point and
    `n_nonfinite` those left out because adaptation diverged (non-finite weights).
    """
    results = _with_defaults(results)
    rows = []
    for (setting, method, shots), group in results.groupby(["setting", "method", "n_shots"], sort=True):
        finite = group[group["finite"].astype(bool)]
        nonfinite = len(group) - len(finite)
        if finite.empty:
            rows.append({"setting": setting, "method": method, "n_shots": shots, "mean": np.nan, "ci_low": np.nan,
                         "ci_high": np.nan, "n_tasks": 0, "n_train_seeds": 0, "n_rows": len(group),
                         "n_nonfinite": nonfinite})  # fmt: skip
            continue
        grid = _complete(cell_means(finite))
        estimate = grid_estimate(grid.to_numpy())
        low, high = _clipped(estimate.interval(), (0.0, 1.0) if _bounded(finite) else None)
        rows.append({"setting": setting, "method": method, "n_shots": shots, "mean": estimate.mean,
                     "ci_low": low, "ci_high": high, "n_tasks": estimate.n_tasks,
                     "n_train_seeds": estimate.n_train_seeds, "n_rows": len(group),
                     "n_nonfinite": nonfinite})  # fmt: skip
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def per_task(results: pd.DataFrame) -> pd.DataFrame:
    """Each task's score per setting x method x n_shots: the mean over evaluation and training seeds of its
    finite rows, with the number of scored points behind it. No interval: a task is one unit, and its
    test set's own sampling error is not what the kit's statistics are about."""
    results = _with_defaults(results)
    finite = results[results["finite"].astype(bool)]
    table = finite.groupby(["setting", "task", "method", "n_shots"], sort=True)["value"].agg(["mean", "count"])
    return table.rename(columns={"count": "n_rows"}).reset_index()


def paired_grid(method_rows: pd.DataFrame, reference_rows: pd.DataFrame) -> pd.DataFrame:
    """Per-cell differences (method minus reference) on the tasks both have.

    A side with a single training seed (an untrained method, or a method trained once) is compared with
    every training seed of the other; two trained sides are paired by training seed.
    """
    method_grid, reference_grid = cell_means(method_rows), cell_means(reference_rows)
    tasks = method_grid.index.intersection(reference_grid.index)
    method_grid, reference_grid = method_grid.loc[tasks], reference_grid.loc[tasks]
    if method_grid.shape[1] == 1 and reference_grid.shape[1] > 1:
        return _complete(reference_grid.rsub(method_grid.iloc[:, 0], axis=0))
    if reference_grid.shape[1] == 1:
        return _complete(method_grid.sub(reference_grid.iloc[:, 0], axis=0))
    seeds = method_grid.columns.intersection(reference_grid.columns)
    return _complete(method_grid[seeds] - reference_grid[seeds])


def significance(results: pd.DataFrame, reference: str = "metalora") -> pd.DataFrame:
    """Each method against `reference` at each setting and n_shots, tasks as the unit of inference.

    Columns: mean_diff (method - reference) with its 95 % CI over tasks and training seeds; effect_size_dz
    (mean task-level difference / its standard deviation over tasks); p_value (t-test of the grid's mean)
    and p_holm (Holm-adjusted across the shot counts of that method and setting); detectable_diff_80 (the smallest
    difference this design detects with 80 % power); run_variation_included (False when a trained side was trained
    once: the interval and p then cover task and evaluation noise only).
    No rows when the reference is absent or is the only method. Rows with non-finite scores are left out.
    """
    results = _with_defaults(results)
    results = results[results["finite"].astype(bool)]
    rows = []
    for setting, in_setting in results.groupby("setting", sort=True):
        methods = set(in_setting["method"])
        if reference not in methods:
            continue
        reference_rows = in_setting[in_setting["method"] == reference]
        for method in sorted(methods - {reference}):
            method_rows = []
            for shots, group in in_setting[in_setting["method"] == method].groupby("n_shots"):
                grid = paired_grid(group, reference_rows[reference_rows["n_shots"] == shots])
                if grid.empty:
                    continue
                pair = pd.concat([group, reference_rows])
                trained = bool({method, reference} & set(TRAINED_METHODS))
                method_rows.append(_comparison_row(setting, method, reference, shots, grid.to_numpy(),
                                                   _bounded(pair), trained))  # fmt: skip
            for row, adjusted in zip(method_rows, holm([r["p_value"] for r in method_rows]), strict=True):
                row["p_holm"] = adjusted
            rows.extend(method_rows)
    return pd.DataFrame(rows, columns=SIGNIFICANCE_COLUMNS)


def _comparison_row(
    setting: str, method: str, reference: str, shots: int, grid: np.ndarray, bounded: bool, trained: bool
) -> dict:
    estimate = grid_estimate(grid)
    low, high = _clipped(estimate.interval(), (-1.0, 1.0) if bounded else None)
    task_diffs = grid.mean(axis=1)
    spread = float(task_diffs.std(ddof=1)) if len(task_diffs) > 1 else 0.0
    return {
        "setting": setting, "method": method, "reference": reference, "n_shots": shots,
        "n_tasks": estimate.n_tasks, "n_train_seeds": estimate.n_train_seeds, "mean_diff": estimate.mean,
        "ci_low": low, "ci_high": high,
        "effect_size_dz": estimate.mean / spread if spread > 0 else float("nan"),
        "p_value": estimate.p_value(), "detectable_diff_80": estimate.detectable_difference(),
        "run_variation_included": not trained or estimate.n_train_seeds > 1,
    }  # fmt: skip


def _clipped(interval: tuple[float, float], bounds: tuple[float, float] | None) -> tuple[float, float]:
    """An interval kept inside the range its quantity can take (a rate's mean cannot fall below 0)."""
    if bounds is None:
        return interval
    return max(interval[0], bounds[0]), min(interval[1], bounds[1])


def _bounded(rows: pd.DataFrame) -> bool:
    return "metric" not in rows or set(rows["metric"]) <= set(BOUNDED_METRICS)


SETTING_PHRASES = {"heldout": "on held-out tasks", "seen": "on the training tasks' own test sets"}


def describe_comparison(row: pd.Series, labels: dict[str, str] | None = None) -> str:
    """One plain sentence on a significance row: who is ahead, by how much (with the CI of that lead), how
    sure, over how many tasks, and what the design could have detected."""
    labels = labels or {}
    method, reference = labels.get(row["method"], row["method"]), labels.get(row["reference"], row["reference"])
    shots = "the whole pool" if row["n_shots"] < 0 else f"{row['n_shots']} shots"
    where = SETTING_PHRASES.get(row["setting"], f"on {row['setting']} tasks")
    units = f"{row['n_tasks']} tasks" + (
        f" x {row['n_train_seeds']} training seeds" if row["n_train_seeds"] > 1 else ""
    )
    diff, low, high = row["mean_diff"], row["ci_low"], row["ci_high"]
    if diff >= 0:
        lead = f"{method} is ahead of {reference} by {diff:.3f}" if diff > 0 else f"{method} ties with {reference}"
    else:
        lead, low, high = f"{reference} is ahead of {method} by {-diff:.3f}", -high, -low
    one_run = not bool(row.get("run_variation_included", True))
    if row["p_holm"] >= 1 - CONFIDENCE:
        verdict = "not a significant difference" + (f" ({ONE_RUN_QUALIFIER})" if one_run else "")
    elif one_run:
        verdict = f"beyond task and evaluation noise, but {ONE_RUN_QUALIFIER}, so not a finding about the methods"
    else:
        verdict = "a clear difference"
    detectable = row["detectable_diff_80"]
    power = (
        f" This design detects differences of {detectable:.3f} or more with 80 % power."
        if np.isfinite(detectable)
        else ""
    )
    return (
        f"At {shots} {where}, {lead} (95 % CI {low:.3f} to {high:.3f}; Holm p = {row['p_holm']:.2g}; "
        f"{units}): {verdict}.{power}"
    )
