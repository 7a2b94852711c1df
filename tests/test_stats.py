import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from metalora.evaluation.stats import (
    describe_comparison,
    grid_estimate,
    holm,
    mean_ci,
    per_task,
    significance,
    summarise,
)


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


def test_grid_estimate_matches_the_crossed_variance_formula():
    rng = np.random.default_rng(3)
    grid = rng.normal(size=(6, 3)) + rng.normal(size=(1, 3)) * 2  # a strong training-seed effect
    estimate = grid_estimate(grid)
    t, s = grid.shape
    task_means, seed_means = grid.mean(1), grid.mean(0)
    ms_task, ms_seed = s * task_means.var(ddof=1), t * seed_means.var(ddof=1)
    resid = grid - task_means[:, None] - seed_means[None, :] + grid.mean()
    ms_resid = (resid**2).sum() / ((t - 1) * (s - 1))
    assert estimate.standard_error == pytest.approx(np.sqrt((ms_task + ms_seed - ms_resid) / (t * s)))
    assert estimate.n_tasks == 6 and estimate.n_train_seeds == 3
    # With one training seed it is the t-test over task means.
    single = grid_estimate(grid[:, :1])
    assert single.p_value() == pytest.approx(sps.ttest_1samp(grid[:, 0], 0).pvalue)


def _table(task_effects, seed_effects=(0.0,), eval_seeds=4, diff=0.0, noise=0.05, rng=None, trained_reference=True):
    """metalora and lora on each task; lora is untrained (one seed), metalora trained per seed."""
    rng = rng or np.random.default_rng(0)
    rows = []
    for task, effect in enumerate(task_effects):
        for eval_seed in range(eval_seeds):
            shared = rng.normal(0, noise)  # the same shots for both methods
            rows.append({"method": "lora", "task": f"t{task}", "n_shots": 5, "seed": eval_seed, "train_seed": -1,
                         "value": 0.4 + effect + shared})  # fmt: skip
            for train_seed, seed_effect in enumerate(seed_effects):
                value = 0.4 + effect + diff + seed_effect + shared + rng.normal(0, noise)
                rows.append({"method": "metalora", "task": f"t{task}", "n_shots": 5, "seed": eval_seed,
                             "train_seed": train_seed if trained_reference else -1, "value": value})  # fmt: skip
    return pd.DataFrame(rows)


def test_evaluation_seeds_within_a_task_do_not_count_as_tasks():
    rng = np.random.default_rng(1)
    effects = rng.normal(0, 0.1, size=5)
    few = summarise(_table(effects, eval_seeds=2, rng=np.random.default_rng(2)))
    many = summarise(_table(effects, eval_seeds=40, rng=np.random.default_rng(2)))
    width = {name: (t["ci_high"] - t["ci_low"]).to_numpy() for name, t in (("few", few), ("many", many))}
    # Twenty times the evaluation seeds: the interval over five tasks barely changes (a row-level CI would
    # shrink by sqrt(20) ~ 4.5x).
    assert (width["many"] > 0.6 * width["few"]).all()
    assert set(many["n_tasks"]) == {5} and set(many["n_rows"]) == {200}


def test_a_difference_present_in_every_task_is_found():
    rng = np.random.default_rng(4)
    table = _table(rng.normal(0, 0.1, size=10), diff=0.1, rng=rng)
    row = significance(table, reference="lora").iloc[0]
    assert row["method"] == "metalora" and row["mean_diff"] == pytest.approx(0.1, abs=0.03)
    assert row["p_holm"] < 0.01 and row["ci_low"] > 0 and row["effect_size_dz"] > 1
    sentence = describe_comparison(row)
    assert sentence.startswith("At 5 shots on held-out tasks, metalora is ahead of lora by 0.1")
    # metalora was trained once: the p covers task and evaluation noise only, and the sentence says so.
    assert not row["run_variation_included"] and "a clear difference" not in sentence and "; 10 tasks)" in sentence
    assert "but one training run per method: run-to-run variation not included, so not a finding" in sentence
    replicated = significance(_table(rng.normal(0, 0.1, size=10), seed_effects=(0.0, 0.01, -0.01), diff=0.1,
                                     rng=rng), reference="lora").iloc[0]  # fmt: skip
    assert replicated["run_variation_included"] and replicated["n_train_seeds"] == 3
    assert "10 tasks x 3 training seeds): a clear difference." in describe_comparison(replicated)


def test_false_positive_rate_near_nominal_when_there_is_no_difference():
    rng = np.random.default_rng(5)
    rejections = 0
    trials = 300
    for _ in range(trials):
        table = _table(rng.normal(0, 0.1, size=8), eval_seeds=2, noise=0.1, rng=rng)
        rejections += significance(table, reference="lora").iloc[0]["p_value"] < 0.05
    assert 0.02 <= rejections / trials <= 0.09


def test_disagreeing_training_seeds_widen_the_interval():
    effects = np.random.default_rng(6).normal(0, 0.1, size=8)
    agree = significance(_table(effects, seed_effects=(0.1, 0.1, 0.1), rng=np.random.default_rng(7)), "lora")
    disagree = significance(_table(effects, seed_effects=(-0.1, 0.1, 0.3), rng=np.random.default_rng(7)), "lora")
    assert agree.iloc[0]["mean_diff"] == pytest.approx(disagree.iloc[0]["mean_diff"], abs=1e-9)
    width_agree = agree.iloc[0]["ci_high"] - agree.iloc[0]["ci_low"]
    width_disagree = disagree.iloc[0]["ci_high"] - disagree.iloc[0]["ci_low"]
    assert width_disagree > 3 * width_agree
    assert agree.iloc[0]["p_value"] < 0.001 < disagree.iloc[0]["p_value"]
    assert disagree.iloc[0]["n_train_seeds"] == 3


def test_two_trained_methods_pair_by_training_seed_and_settings_stay_apart():
    table = _table(np.linspace(-0.1, 0.1, 6), seed_effects=(0.0, 0.2), diff=0.05)
    other = table[table["method"] == "metalora"].assign(method="multitask", value=lambda f: f["value"] - 0.05)
    table = pd.concat([table, other, table.assign(setting="seen")]).fillna({"setting": "heldout"})
    sig = significance(table, reference="metalora")
    multitask = sig[(sig["method"] == "multitask") & (sig["setting"] == "heldout")].iloc[0]
    assert multitask["mean_diff"] == pytest.approx(-0.05) and multitask["n_train_seeds"] == 2
    assert set(sig["setting"]) == {"heldout", "seen"}
    assert len(sig[sig["setting"] == "seen"]) == 1  # only lora is in the seen copy besides the reference


def test_summary_and_significance_tables():
    results = _table(np.linspace(0, 0.2, 3), diff=0.3, noise=0.0)
    summary = summarise(results)
    assert list(summary.columns[:3]) == ["setting", "method", "n_shots"]
    assert set(summary["n_tasks"]) == {3}
    sig = significance(results, reference="metalora")
    assert set(sig["method"]) == {"lora"}
    assert sig["mean_diff"].tolist() == pytest.approx([-0.3])
    assert significance(results[results["method"] == "lora"]).empty
    alone = significance(results[results["method"] == "metalora"])
    assert alone.empty and list(alone.columns) == list(sig.columns)


def test_per_task_scores_average_every_seed_and_leave_out_diverged_rows():
    rows = [
        {"method": "metalora", "task": "a", "n_shots": 5, "seed": s, "train_seed": t, "value": v, "finite": True}
        for s, t, v in ((0, 0, 0.2), (1, 0, 0.4), (0, 1, 0.6), (1, 1, 0.8))
    ]
    rows.append({"method": "metalora", "task": "a", "n_shots": 5, "seed": 2, "train_seed": 1, "value": float("nan"),
                 "finite": False})  # fmt: skip
    rows.append({"method": "metalora", "task": "b", "n_shots": 5, "seed": 0, "train_seed": 0, "value": 1.0,
                 "finite": True})  # fmt: skip
    table = per_task(pd.DataFrame(rows)).set_index("task")
    assert table.loc["a", "mean"] == pytest.approx(0.5) and table.loc["a", "n_rows"] == 4
    assert table.loc["b", "mean"] == 1.0 and set(table["setting"]) == {"heldout"}


def crossed_differences(rng, tasks, runs, diff=0.0, task_sd=0.05, run_sd=0.1, interaction_sd=0.05, eval_sd=0.03):
    """Per-cell differences (method minus reference) of one simulated tasks x training-runs table: a task x method
    effect shared by every run, each method's run effects shared by every task, a run x task interaction per
    cell and evaluation noise."""
    task = rng.normal(diff, task_sd, size=(tasks, 1))
    run = rng.normal(0, run_sd, size=(1, runs)) - rng.normal(0, run_sd, size=(1, runs))
    return task + run + rng.normal(0, interaction_sd, (tasks, runs)) + rng.normal(0, eval_sd, (tasks, runs))


def rejection_rate(rng, trials, **design) -> float:
    return float(np.mean([grid_estimate(crossed_differences(rng, **design)).p_value() < 0.05 for _ in range(trials)]))


@pytest.mark.parametrize("runs", [3, 5])
@pytest.mark.parametrize("run_sd", [0.02, 0.1])
def test_the_crossed_estimator_holds_its_level_under_the_null_with_run_effects(runs, run_sd):
    rate = rejection_rate(np.random.default_rng(100 + runs), 400, tasks=10, runs=runs, run_sd=run_sd)
    assert 0.02 <= rate <= 0.09, f"false-positive rate {rate:.3f} at alpha 0.05"


def test_one_training_run_cannot_hold_the_level_where_run_variation_dominates():
    # Why a one-run comparison carries its qualifier: its p sees no run-to-run variation.
    rate = rejection_rate(np.random.default_rng(8), 400, tasks=10, runs=1, run_sd=0.1)
    assert rate > 0.3


def test_the_crossed_estimators_power_rises_with_training_runs():
    rng = np.random.default_rng(9)
    power = [rejection_rate(rng, 300, tasks=10, runs=runs, diff=0.1, run_sd=0.05) for runs in (2, 4, 8)]
    assert power[0] < power[1] < power[2]


def test_intervals_of_rates_stay_inside_their_range():
    rows = [{"method": m, "task": f"t{t}", "n_shots": 5, "seed": 0, "metric": "exact_match",
             "value": 1.0 if (m, t) == ("lora", 0) else 0.0}
            for m in ("lora", "metalora") for t in range(5)]  # fmt: skip
    summary = summarise(pd.DataFrame(rows)).set_index("method")
    assert summary.loc["lora", "ci_low"] == 0.0 and summary.loc["lora", "ci_high"] <= 1.0
    wide = pd.DataFrame(rows).assign(value=lambda f: np.where(f["task"] == "t0", f["value"], 1.0 - f["value"]))
    diff = significance(wide, reference="metalora").iloc[0]
    assert diff["ci_low"] >= -1.0 and diff["ci_high"] <= 1.0
    unbounded = summarise(pd.DataFrame(rows).assign(metric="loss")).set_index("method")
    assert unbounded.loc["lora", "ci_low"] < 0.0
