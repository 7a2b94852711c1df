"""Summary statistics and significance tests over few-shot results (scipy does the statistics).

Paired comparisons pair two methods on the same (task, n_shots, seed) point: the same shots, the same
test set, so the difference isolates the initialisation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
SIGNIFICANCE_COLUMNS = [
    "method", "reference", "n_shots", "n_pairs", "mean_diff", "ci_low", "ci_high", "p_wilcoxon", "p_holm",
]  # fmt: skip


def mean_ci(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval of `values`.

    Args:
        values: observations.
        confidence: interval coverage.

    Returns:
        (mean, low, high); low = high = mean for fewer than two observations or zero spread.
    """
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2 or float(values.std()) == 0.0:
        return mean, mean, mean
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, float(low), float(high)


def paired_bootstrap_ci(differences: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences.

    Args:
        differences: per-point differences (method minus reference).
        seed: resampling seed.

    Returns:
        (low, high); both equal the mean when there is no spread.
    """
    differences = np.asarray(differences, dtype=float)
    if len(differences) < 2 or float(differences.std()) == 0.0:
        mean = float(differences.mean())
        return mean, mean
    result = stats.bootstrap(
        (differences,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=CONFIDENCE,
        method="percentile", rng=np.random.default_rng(seed),
    )  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (1.0 when all are zero)."""
    differences = np.asarray(differences, dtype=float)
    if not np.any(differences != 0):
        return 1.0
    return float(stats.wilcoxon(differences, zero_method="wilcox").pvalue)


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


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95 % CI per method x n_shots over tasks x seeds.

    Args:
        results: long-form rows with method, n_shots, value.

    Returns:
        Columns method, n_shots, mean, ci_low, ci_high, n.
    """
    rows = []
    for (method, shots), group in results.groupby(["method", "n_shots"], sort=True):
        mean, low, high = mean_ci(group["value"].to_numpy())
        rows.append({"method": method, "n_shots": shots, "mean": mean, "ci_low": low, "ci_high": high,
                     "n": len(group)})  # fmt: skip
    return pd.DataFrame(rows)


def significance(results: pd.DataFrame, reference: str = "metalora") -> pd.DataFrame:
    """Each method against `reference` at each n_shots, paired on (task, seed).

    Args:
        results: long-form rows with method, task, n_shots, seed, value.
        reference: the method every other is compared with.

    Returns:
        Columns method, reference, n_shots, n_pairs, mean_diff (method - reference), ci_low, ci_high,
        p_wilcoxon, p_holm (Holm-adjusted across the shot counts of that method). No rows when the
        reference is absent or is the only method.
    """
    if reference not in set(results["method"]):
        return pd.DataFrame(columns=SIGNIFICANCE_COLUMNS)
    keys = ["task", "n_shots", "seed"]
    ref = results[results["method"] == reference].set_index(keys)["value"]
    rows = []
    for method in sorted(set(results["method"]) - {reference}):
        other = results[results["method"] == method].set_index(keys)["value"]
        paired = pd.concat([other.rename("method"), ref.rename("reference")], axis=1, join="inner").dropna()
        method_rows = []
        for shots, group in paired.groupby(level="n_shots"):
            diff = (group["method"] - group["reference"]).to_numpy()
            low, high = paired_bootstrap_ci(diff)
            method_rows.append({"method": method, "reference": reference, "n_shots": shots, "n_pairs": len(diff),
                                "mean_diff": float(diff.mean()), "ci_low": low, "ci_high": high,
                                "p_wilcoxon": wilcoxon_p(diff)})  # fmt: skip
        for row, adjusted in zip(method_rows, holm([r["p_wilcoxon"] for r in method_rows]), strict=True):
            row["p_holm"] = adjusted
        rows.extend(method_rows)
    return pd.DataFrame(rows, columns=SIGNIFICANCE_COLUMNS)
