import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from metalora.stats import holm, mean_ci, paired_bootstrap_ci, significance, summarise, wilcoxon_p


def test_mean_ci_matches_the_t_interval():
    values = np.array([0.2, 0.4, 0.5, 0.9, 0.3])
    mean, low, high = mean_ci(values)
    half = sps.t.ppf(0.975, 4) * values.std(ddof=1) / np.sqrt(5)
    assert mean == pytest.approx(0.46)
    assert (low, high) == pytest.approx((0.46 - half, 0.46 + half))
    assert mean_ci(np.array([0.5, 0.5])) == (0.5, 0.5, 0.5)


def test_holm_on_a_known_example():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_wilcoxon_matches_scipy_and_handles_all_zero():
    diff = np.array([0.1, 0.3, -0.05, 0.2, 0.4, 0.15, 0.25])
    assert wilcoxon_p(diff) == pytest.approx(sps.wilcoxon(diff).pvalue)
    assert wilcoxon_p(np.zeros(5)) == 1.0


def test_paired_bootstrap_ci_brackets_the_mean_and_is_seeded():
    diff = np.random.default_rng(0).normal(0.3, 0.1, size=40)
    low, high = paired_bootstrap_ci(diff)
    assert low < diff.mean() < high and high - low < 0.2
    assert paired_bootstrap_ci(diff) == (low, high)


def _results():
    rows = []
    for task in ("a", "b", "c"):
        for seed in range(4):
            for shots in (0, 5):
                base = 0.1 * seed + (0.2 if task == "b" else 0.0)
                rows.append({"method": "metalora", "task": task, "n_shots": shots, "seed": seed, "value": base + 0.3})
                rows.append({"method": "lora", "task": task, "n_shots": shots, "seed": seed, "value": base})
    return pd.DataFrame(rows)


def test_summary_and_significance_tables():
    results = _results()
    summary = summarise(results)
    assert list(summary.columns) == ["method", "n_shots", "mean", "ci_low", "ci_high", "n"]
    assert set(summary["n"]) == {12}
    sig = significance(results)
    assert list(sig["n_shots"]) == [0, 5] and set(sig["method"]) == {"lora"}
    assert sig["mean_diff"].tolist() == pytest.approx([-0.3, -0.3])
    assert (sig["p_holm"] >= sig["p_wilcoxon"]).all()
    assert significance(results[results["method"] == "lora"]).empty
    alone = significance(results[results["method"] == "metalora"])
    assert alone.empty and list(alone.columns) == list(sig.columns)
