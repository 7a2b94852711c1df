"""What an evaluation checks before it scores anything: no trained run saw evaluated data, every run was trained on
the split, budget, model and LoRA settings this evaluation expects, and every shot count fits its pool.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from metalora.config import Config, load_config
from metalora.data.splits import EvalPools, Splits
from metalora.experiments.runs import EvaluationError, TrainedRun, config_for_method
from metalora.io import CHECKSUMS, ChecksumError, verify_checksums
from metalora.training.budgets import planned_steps


def recorded_splits(method: str, run_dir: Path) -> dict:
    """A run's splits.json, the record of which example it trained on.

    Raises:
        EvaluationError: the file is missing or unreadable (a run without it cannot be checked for leaks).
    """
    path = run_dir / "splits.json"
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        splits, reason = None, str(err)
    else:
        reason = "it lists no training pools"
    if not isinstance(splits, dict) or not isinstance(splits.get("train"), dict):
        raise EvaluationError(f"{method} run {run_dir}: {path.name} is missing or unreadable ({reason}): without "
                              "it the run cannot be checked for leaks, so it is not evaluated")  # fmt: skip
    return splits


def check_no_leak(evaluation: Splits, method: str, run_dir: Path) -> None:
    """Refuse a trained run that saw a held-out task, any evaluated example, or any group of one.

    Evaluated examples are the held-out tasks' adaptation pools and test sets and, in the seen scenario,
    the training tasks' test sets; a group (an item's translations) counts as seen when any of its
    examples was trained on.

    Raises:
        EvaluationError: naming the method, the run and the overlapping tasks, examples or groups.
    """
    recorded = recorded_splits(method, run_dir)
    seen_tasks = set(recorded["train"]) & set(evaluation.heldout)
    if seen_tasks:
        raise EvaluationError(f"{method} run {run_dir} meta-trained on held-out task(s) {sorted(seen_tasks)}")
    trained = {i for pools in recorded["train"].values() for i in pools["support"] + pools["query"]}
    evaluated = [e for p in evaluation.heldout.values() for e in p.adapt + p.test]
    evaluated += [e for p in evaluation.seen.values() for e in p.test]
    leaked = sorted(e.id for e in evaluated if e.id in trained)
    if leaked:
        raise EvaluationError(f"{method} run {run_dir} trained on evaluated example(s) {leaked[:5]}")
    trained_groups = {evaluation.groups[i] for i in trained if i in evaluation.groups}
    shared = sorted({e.group for e in evaluated if e.group is not None} & trained_groups)
    if shared:
        raise EvaluationError(
            f"{method} run {run_dir} trained on translations of evaluated item(s): groups {shared[:5]}"
        )


# What an adapter or a full model only fits when it matches: these settings of a trained run must equal the
# evaluation's own (an adapter trained at alpha 64 applied at alpha 8 is a different model; weights trained on one
# prompt format and scored on another measure the format as much as the method).
MATCHING_SETTINGS = (
    "model.name", "lora.r", "lora.alpha", "lora.target_modules", "data.prompt_template", "data.chat_template",
)  # fmt: skip


def check_run_record(cfg: Config, run: TrainedRun) -> TrainedRun:
    """Judge a trained run by what it recorded, not by the evaluating config; returns the run labelled by its record.

    The run must have its config.yaml (without it nothing below could be checked), the algorithm its method
    stands for, this evaluation's model and LoRA settings, weights that match their checksums, and, unless
    `eval.runs` names it, the step count this config plans (a multi-task baseline of another length is not the
    compute-matched one). Its training seed and steps come from its own record.

    Raises:
        EvaluationError: naming the run, the setting and both values, or the missing or changed file.
    """
    weight_file = run.weights / ("model.safetensors" if run.method == "fomaml" else "adapter_model.safetensors")
    if not weight_file.is_file():
        raise EvaluationError(f"{run.method} run {run.run_dir}: its {'model' if run.method == 'fomaml' else 'adapter'} "
                              f"weights are missing ({weight_file})")  # fmt: skip
    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        raise EvaluationError(f"{run.method} run {run.run_dir} has no config.yaml: without the run's own record the "
                              "kit cannot tell what it trained, so it does not evaluate it")  # fmt: skip
    theirs = load_config([saved])
    expected = config_for_method(cfg, run.method, run.train_seed)
    if theirs.meta.algorithm != expected.meta.algorithm:
        raise EvaluationError(f"{run.method} run {run.run_dir} was trained with meta.algorithm="
                              f"{theirs.meta.algorithm}, not {expected.meta.algorithm}: it would be reported as "
                              f"{run.method}")  # fmt: skip
    keys = [k for k in MATCHING_SETTINGS if run.method != "fomaml" or not k.startswith("lora.")]
    for key in keys:
        group, name = key.split(".")
        ours, recorded = getattr(getattr(cfg, group), name), getattr(getattr(theirs, group), name)
        if ours != recorded:
            raise EvaluationError(
                f"{run.method} run {run.run_dir} does not fit this evaluation: {key}: the run has {recorded}, "
                f"this evaluation {ours}"
            )
    _check_weights_verified(run)
    steps = _recorded_steps(run)
    planned = planned_steps(expected)
    if not run.explicit and steps != planned:
        raise EvaluationError(
            f"{run.method} run {run.run_dir} trained {steps} steps, but this config plans {planned}: it would be "
            f"reported as this config's {run.method}; retrain it, or name it in eval.runs.{run.method} to evaluate it "
            "as the run it is"
        )
    return replace(run, train_seed=theirs.train.seed, steps=steps)


def checksum_record(run: TrainedRun) -> Path:
    """The checksums.json covering a run's weights: beside them, or in the checkpoint holding them.

    Raises:
        EvaluationError: there is none (the kit writes one beside every weight file it saves).
    """
    holder = next((d for d in (run.weights, run.weights.parent) if (d / CHECKSUMS).is_file()), None)
    if holder is None:
        raise EvaluationError(f"{run.method} run {run.run_dir}: {run.weights} has no {CHECKSUMS}, so its weights "
                              "cannot be verified (the kit writes one beside every weight file it saves)")  # fmt: skip
    return holder / CHECKSUMS


def _check_weights_verified(run: TrainedRun) -> None:
    """The weights' checksum record exists and matches the files."""
    try:
        verify_checksums(checksum_record(run).parent)
    except ChecksumError as err:
        raise EvaluationError(f"{run.method} run {run.run_dir}: {err}") from err


def _recorded_steps(run: TrainedRun) -> int:
    """The steps behind the weights: a checkpoint's state.json, else the finished run's summary.json."""
    for record, key in ((run.weights.parent / "state.json", "step"), (run.run_dir / "summary.json", "steps")):
        if record.is_file():
            return int(json.loads(record.read_text())[key])
    raise EvaluationError(f"{run.method} run {run.run_dir} has no summary.json: it did not finish")


def check_same_split(expected: Splits, method: str, run_dir: Path) -> None:
    """Refuse a run whose training pools differ from the ones this evaluation expects, naming both budgets.

    Raises:
        EvaluationError: another scenario, split seed, task set or sample budget than expected.
    """
    splits = recorded_splits(method, run_dir)

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


def check_shots(cfg: Config, evaluated: dict[str, dict[str, EvalPools]]) -> None:
    for setting, pools in evaluated.items():
        for name, pool in pools.items():
            too_many = [n for n in cfg.eval.n_shots if n > len(pool.adapt)]
            if too_many:
                raise EvaluationError(
                    f"eval.n_shots {too_many} exceed the {len(pool.adapt)} examples {setting} task '{name}' "
                    "can adapt on (its adaptation pool, or in the seen scenario its sample budget)"
                )
