"""What an evaluation checks before it scores anything: no trained run saw evaluated data, every run was trained on
the split, budget, model and LoRA settings this evaluation expects, and every shot count fits its pool.
"""

from __future__ import annotations

import json
from pathlib import Path

from metalora.config import Config, load_config
from metalora.data.splits import Experiment, HeldoutPools
from metalora.experiments.runs import EvaluationError, TrainedRun


def check_no_leak(experiment: Experiment, method: str, run_dir: Path) -> None:
    """Refuse a trained run that saw a held-out task, any evaluated example, or any group of one.

    Evaluated examples are the held-out tasks' adaptation pools and test sets and, in the seen scenario,
    the training tasks' test sets; a group (an item's translations) counts as seen when any of its
    examples was trained on.

    Raises:
        EvaluationError: naming the method, the run and the overlapping tasks, examples or groups.
    """
    splits = json.loads((run_dir / "splits.json").read_text())
    seen_tasks = set(splits["train"]) & set(experiment.heldout)
    if seen_tasks:
        raise EvaluationError(f"{method} run {run_dir} meta-trained on held-out task(s) {sorted(seen_tasks)}")
    trained = {i for pools in splits["train"].values() for i in pools["support"] + pools["query"]}
    evaluated = [e for p in experiment.heldout.values() for e in p.adapt + p.test]
    evaluated += [e for p in experiment.seen.values() for e in p.test]
    leaked = sorted(e.id for e in evaluated if e.id in trained)
    if leaked:
        raise EvaluationError(f"{method} run {run_dir} trained on evaluated example(s) {leaked[:5]}")
    trained_groups = {experiment.groups[i] for i in trained if i in experiment.groups}
    shared = sorted({e.group for e in evaluated if e.group is not None} & trained_groups)
    if shared:
        raise EvaluationError(
            f"{method} run {run_dir} trained on translations of evaluated item(s): groups {shared[:5]}"
        )


# What an adapter or a full model only fits when it matches: these settings of a trained run must equal the
# evaluation's own (an adapter trained at alpha 64 applied at alpha 8 is a different model).
MATCHING_SETTINGS = ("model.name", "lora.r", "lora.alpha", "lora.target_modules")


def check_run_settings(cfg: Config, run: TrainedRun) -> None:
    """Refuse a trained run whose weights are missing or whose model or LoRA settings differ from `cfg`'s.

    Raises:
        EvaluationError: naming the setting and both values, or the missing weight file.
    """
    weight_file = run.weights / ("model.safetensors" if run.method == "fomaml" else "adapter_model.safetensors")
    if not weight_file.is_file():
        raise EvaluationError(f"{run.method} run {run.run_dir}: its {'model' if run.method == 'fomaml' else 'adapter'} "
                              f"weights are missing ({weight_file})")  # fmt: skip
    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        return
    theirs = load_config([saved])
    keys = [k for k in MATCHING_SETTINGS if run.method != "fomaml" or k.startswith("model.")]
    for key in keys:
        group, name = key.split(".")
        ours, recorded = getattr(getattr(cfg, group), name), getattr(getattr(theirs, group), name)
        if ours != recorded:
            raise EvaluationError(
                f"{run.method} run {run.run_dir} does not fit this evaluation: {key}: the run has {recorded}, "
                f"this evaluation {ours}"
            )


def check_same_split(expected: Experiment, method: str, run_dir: Path) -> None:
    """Refuse a run whose training pools differ from the ones this evaluation expects, naming both budgets.

    Raises:
        EvaluationError: another scenario, split seed, task set or sample budget than expected.
    """
    splits = json.loads((run_dir / "splits.json").read_text())

    def describe(scenario: object, seed: object, budgets: dict) -> str:
        values = sorted({str(b) for b in budgets.values()})
        return f"scenario {scenario}, data.split_seed {seed}, samples per task {', '.join(values) or '?'}"

    theirs = describe(splits.get("scenario", "heldout"), splits.get("split_seed", "?"),
                      {n: p.get("budget") for n, p in splits["train"].items()})  # fmt: skip
    ours = describe(expected.scenario, expected.split_seed, expected.budgets)
    if set(splits["train"]) != set(expected.train):
        raise EvaluationError(
            f"{method} run {run_dir} trained on tasks {sorted(splits['train'])[:5]}..., "
            f"this evaluation expects {sorted(expected.train)[:5]}... ({theirs} vs {ours})"
        )
    for name, pools in expected.train.items():
        recorded = splits["train"][name]
        if set(recorded["support"] + recorded["query"]) != {e.id for e in pools.support + pools.query}:
            raise EvaluationError(
                f"{method} run {run_dir} trained task '{name}' on another split or budget than this evaluation "
                f"expects: the run has {theirs}; this evaluation has {ours}"
            )


def check_shots(cfg: Config, evaluated: dict[str, dict[str, HeldoutPools]]) -> None:
    for setting, pools in evaluated.items():
        for name, pool in pools.items():
            too_many = [n for n in cfg.eval.n_shots if n > len(pool.adapt)]
            if too_many:
                raise EvaluationError(
                    f"eval.n_shots {too_many} exceed the {len(pool.adapt)} examples {setting} task '{name}' "
                    "can adapt on (its adaptation pool, or in the seen scenario its sample budget)"
                )
