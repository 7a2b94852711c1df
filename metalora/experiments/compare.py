"""`metalora eval`: few-shot curves of every compared initialisation, with statistics and figures.

Writes into `<run_dir>/eval/`: results.csv (long form), summary.csv, significance.csv,
efficiency.csv, few_shot.png and efficiency.png. Trained methods are read from their run
directories (see `method_run_dir`); `train_missing=True` trains the ones that are not there yet.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from metalora.config import ALL_SAMPLES, TRAINED_METHODS, Config, load_config, save_config
from metalora.data.splits import Experiment, HeldoutPools, build_experiment
from metalora.errors import MetaloraError
from metalora.evaluation.fewshot import (
    AdaptSettings,
    EvalRow,
    adapter_init,
    constant_answer_rows,
    evaluate_init,
    rows_as_dicts,
    snapshot_lora,
)
from metalora.evaluation.stats import SINGLE_TRAINING_SEED, per_task, significance, summarise
from metalora.io import atomic_directory, atomic_write_text
from metalora.modeling.build import load_base
from metalora.modeling.lora import attach_lora
from metalora.modeling.models import pick_device
from metalora.reporting.efficiency import efficiency_table
from metalora.reporting.plots import efficiency_figure, few_shot_figure, per_task_figure
from metalora.training.budgets import FULL_DATA_SHOTS, multitask_plan
from metalora.training.checkpoints import STEP_DIR, load_full_weights


class EvaluationError(MetaloraError):
    """A compared method cannot be evaluated (missing run, leaking split, no held-out tasks)."""


@dataclass
class TrainedRun:
    """One trained initialisation: a method's run (one training seed), possibly at an intermediate checkpoint."""

    method: str
    train_seed: int
    run_dir: Path
    # The adapter directory (or, for fomaml, the full-model directory) the evaluation loads.
    weights: Path


def training_seeds(cfg: Config) -> list[int]:
    """The training seeds of the replicates: train.seed, train.seed + 1, ... (train.seeds of them)."""
    return [cfg.train.seed + i for i in range(cfg.train.seeds)]


def method_run_dir(cfg: Config, method: str, train_seed: int | None = None) -> Path:
    """The run directory a trained method is read from.

    `eval.runs[method]` when given; else this config's own run directory for its `meta.algorithm`;
    else `<output_dir>/<run_name>-<method>`. With several training seeds, each replicate's directory
    is that name with `-seed<N>` appended.
    """
    if method in cfg.eval.runs:
        base = Path(cfg.eval.runs[method])
    elif method == cfg.meta.algorithm:
        base = cfg.run_dir
    else:
        base = Path(cfg.train.output_dir) / f"{cfg.train.run_name}-{method}"
    if cfg.train.seeds == 1 or train_seed is None:
        return base
    return base.with_name(f"{base.name}-seed{train_seed}")


def _checkpoint_root(path: Path) -> Path | None:
    """The run directory of an intermediate checkpoint `<run>/checkpoints/step_N`, else None."""
    if STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def _multitask_full_budget(cfg: Config) -> int:
    """Example-gradients of multitask_full: `baseline.multitask_full_epochs` passes over all its pooled data,
    and never less than the multi-task baseline's own budget."""
    everything = copy.deepcopy(cfg.data)
    everything.samples_per_task = ALL_SAMPLES
    pooled = sum(len(p.support) + len(p.query) for p in build_experiment(everything, cfg.eval.scenario).train.values())
    return max(multitask_plan(cfg).example_gradients, math.ceil(cfg.baseline.multitask_full_epochs * pooled))


def config_for_method(cfg: Config, method: str, train_seed: int | None = None) -> Config:
    """The config that trains `method` (one replicate) into the directory `method_run_dir` names.

    multitask_full is the multi-task baseline with every non-test example of the training tasks
    (`data.samples_per_task=all`).
    """
    derived = copy.deepcopy(cfg)
    run_dir = method_run_dir(cfg, method, train_seed)
    derived.meta.algorithm = "multitask" if method == "multitask_full" else method
    if method == "multitask_full":
        derived.baseline.multitask_example_gradients = _multitask_full_budget(cfg)
        derived.data.samples_per_task = ALL_SAMPLES
    if train_seed is not None:
        derived.train.seed = train_seed
    derived.train.seeds = 1
    derived.train.output_dir = str(run_dir.parent)
    derived.train.run_name = run_dir.name
    return derived


def ensure_trained(cfg: Config, methods: list[str], train_missing: bool) -> list[TrainedRun]:
    """The trained runs of the trained methods among `methods` (every training seed), training missing ones
    when asked.

    Each missing run trains in a child process (`python -m metalora.training.train`), so its logged peak
    memory is its own and not that of whatever this process ran before. An `eval.runs` entry may name an
    intermediate checkpoint (`<run>/checkpoints/step_N`), which is evaluated as it is.

    Raises:
        EvaluationError: a run is missing (or unfinished) and `train_missing` is False, or its
            training failed.
    """
    runs = []
    for method in (m for m in methods if m in TRAINED_METHODS):
        for seed in training_seeds(cfg):
            run_dir = method_run_dir(cfg, method, seed)
            root = _checkpoint_root(run_dir)
            if root is not None:
                if not (run_dir / "state.json").is_file():
                    raise EvaluationError(f"eval.runs.{method}: {run_dir} is not a complete checkpoint")
                weights = run_dir / ("model" if method == "fomaml" else "adapter")
                runs.append(TrainedRun(method, seed, root, weights))
                continue
            if not (run_dir / "summary.json").is_file():
                if not train_missing:
                    raise EvaluationError(
                        f"eval.methods has '{method}' but {run_dir} holds no finished run: train it with "
                        f"`metalora train <params> meta.algorithm={method} train.run_name={run_dir.name}`, "
                        f"point eval.runs.{method} at a run, or pass --train-missing"
                    )
                _train_in_child(config_for_method(cfg, method, seed), resume=(run_dir / "checkpoints").is_dir())
            runs.append(TrainedRun(method, seed, run_dir, run_dir / ("model" if method == "fomaml" else "adapter")))
    return runs


def _train_in_child(cfg: Config, resume: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        params = save_config(cfg, tmp)
        command = [sys.executable, "-m", "metalora.training.train", str(params), *(["--resume"] if resume else [])]
        child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        errors = []
        for line in child.stderr:  # echoed as it comes (progress), errors kept for the exception
            sys.stderr.write(line)
            if "error:" in line:
                errors.append(line.strip())
        status = child.wait()
    if status != 0:
        reason = errors[-1] if errors else "see its output above"
        raise EvaluationError(
            f"training {cfg.meta.algorithm} into {cfg.run_dir} failed (exit status {status}): {reason}"
        )


def _evaluated_pools(experiment: Experiment) -> dict[str, dict[str, HeldoutPools]]:
    """The pools scored per setting: held-out tasks always, training tasks' test sets in the seen scenario."""
    settings = {"heldout": experiment.heldout, "seen": experiment.seen}
    return {setting: pools for setting, pools in settings.items() if pools}


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


def run_evaluation(cfg: Config, train_missing: bool = False) -> Path:
    """Evaluate every method of `cfg.eval.methods` and write the tables and figures.

    The held-out tasks are scored few-shot; in the seen scenario the training tasks are scored on their
    own test sets as well (`setting` column). Every training seed of a trained method is scored.

    Args:
        cfg: the config (data, LoRA, eval and baseline settings; the run directory receives eval/).
        train_missing: train methods whose run directory holds no finished run.

    Returns:
        The eval directory.

    Raises:
        EvaluationError: nothing to evaluate, a missing run, a run trained on another split or budget, a
            run that saw evaluated data, or shot counts larger than a task's adaptation pool.
    """
    # The process group is joined only under a multi-process launch: in one process (a notebook that trains
    # next) accelerate's process-wide state stays untouched for the Accelerator training creates.
    state = PartialState(cpu=cfg.train.cpu) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    if world > 1 and train_missing:
        raise EvaluationError(
            "--train-missing trains in one process: run `metalora eval --train-missing` without accelerate launch, "
            "or train first (accelerate launch -m metalora.training.train) and launch the evaluation alone"
        )
    experiment = build_experiment(cfg.data, cfg.eval.scenario)
    evaluated = _evaluated_pools(experiment)
    if not evaluated:
        raise EvaluationError("no tasks to evaluate on: set data.heldout_tasks (glob patterns) or eval.scenario=seen")
    _check_shots(cfg, evaluated)
    runs = ensure_trained(cfg, list(cfg.eval.methods), train_missing)
    expected: dict[str, Experiment] = {}
    for run in runs:
        check_run_settings(cfg, run)
        method_cfg = config_for_method(cfg, run.method, run.train_seed)
        key = repr(method_cfg.data.samples_per_task)
        if key not in expected:
            expected[key] = build_experiment(method_cfg.data, cfg.eval.scenario)
        check_same_split(expected[key], run.method, run.run_dir)
        check_no_leak(experiment, run.method, run.run_dir)
    device = state.device if state and state.device.type == "cuda" else pick_device(cfg.train.cpu)
    rows = _evaluate_methods(cfg, shard(evaluated, rank, world), runs, device)
    out = cfg.run_dir / "eval"
    if world > 1:
        rows = gather_object(rows)
        if rank != 0:
            return out
    results = pd.DataFrame(rows_as_dicts(sorted(rows, key=_row_order)), columns=list(EvalRow.__dataclass_fields__))
    # Written whole or not at all: a failed evaluation leaves the previous eval/ as it was, and a new one
    # replaces it entirely, so no file of an older evaluation survives beside newer results.
    with atomic_directory(out) as tmp:
        save_config(cfg, tmp)
        write_statistics(results, tmp, cfg.eval.reference)
        if runs:
            efficiency = efficiency_table([(r.method, r.train_seed, r.run_dir) for r in runs])
            _write_csv(efficiency, tmp / "efficiency.csv")
            efficiency_figure(efficiency, tmp / "efficiency.png")
    return out


def shard(evaluated: dict[str, dict[str, HeldoutPools]], rank: int, world: int) -> dict[str, dict[str, HeldoutPools]]:
    """This process's share of the evaluated tasks: every `world`-th (setting, task) pair from `rank` on.

    Every evaluation point is a pure function of its task, shot count and seed, so the union of the shares
    scores exactly what one process scores.
    """
    pairs = [(setting, task) for setting in sorted(evaluated) for task in sorted(evaluated[setting])]
    mine: dict[str, dict[str, HeldoutPools]] = {}
    for setting, task in pairs[rank::world]:
        mine.setdefault(setting, {})[task] = evaluated[setting][task]
    return mine


def _row_order(row: EvalRow) -> tuple:
    return (row.setting, row.method, row.train_seed, row.task, row.n_shots, row.seed)


def write_statistics(results: pd.DataFrame, out: Path, reference: str) -> None:
    """Write results.csv, summary.csv, significance.csv, per_task.csv and their figures from a result table.

    Also the way to recompute the tables of an older eval directory from its results.csv.
    """
    _write_csv(results, out / "results.csv")
    summary = summarise(results)
    _write_csv(summary, out / "summary.csv")
    _write_csv(significance(results, reference=reference), out / "significance.csv")
    few_shot_figure(summary, out / "few_shot.png", results=results)
    tasks = per_task(results)
    _write_csv(tasks, out / "per_task.csv")
    per_task_figure(tasks, out / "per_task.png")


def _check_shots(cfg: Config, evaluated: dict[str, dict[str, HeldoutPools]]) -> None:
    for setting, pools in evaluated.items():
        for name, pool in pools.items():
            too_many = [n for n in cfg.eval.n_shots if n > len(pool.adapt)]
            if too_many:
                raise EvaluationError(
                    f"eval.n_shots {too_many} exceed the {len(pool.adapt)} examples {setting} task '{name}' "
                    "can adapt on (its adaptation pool, or in the seen scenario its sample budget)"
                )


def _evaluate_methods(
    cfg: Config, evaluated: dict[str, dict[str, HeldoutPools]], runs: list[TrainedRun], device: torch.device
) -> list[EvalRow]:
    model, encoder = load_base(cfg, device)
    settings = AdaptSettings(cfg.eval.adapt_steps, cfg.eval.adapt_lr, cfg.meta.inner_optimizer,
                             cfg.meta.inner_batch_size, cfg.meta.micro_batch_size)  # fmt: skip

    def curve(net: torch.nn.Module, method: str, init: dict, shots: list[int], how: AdaptSettings,
              train_seed: int = SINGLE_TRAINING_SEED) -> list[EvalRow]:  # fmt: skip
        rows = []
        for setting, pools in evaluated.items():
            scored = evaluate_init(net, method, init, pools, encoder, shots, cfg.eval.seeds, how,
                                   cfg.eval.max_test, cfg.eval.batch_size, cfg.eval.test_loss)  # fmt: skip
            rows += [replace(row, setting=setting, train_seed=train_seed) for row in scored]
        return rows

    methods = list(cfg.eval.methods)
    rows: list[EvalRow] = []
    for run in (r for r in runs if r.method == "fomaml"):
        full_model, _ = load_base(cfg, device)
        load_full_weights(full_model, run.weights)
        full_model.eval()
        init = {k: v.detach() for k, v in full_model.named_parameters()}
        rows += curve(full_model, "fomaml", init, list(cfg.eval.n_shots), settings, run.train_seed)
        del full_model, init
    # The fresh init of the `lora` and `full_data` methods: the one meta-training started from.
    peft_model = attach_lora(model, cfg.lora, cfg.train.seed, cfg.speed.cpu_dropout_masks)
    fresh = snapshot_lora(peft_model)
    full_data = AdaptSettings(cfg.baseline.full_data_steps, cfg.baseline.full_data_lr, cfg.meta.inner_optimizer,
                              cfg.meta.inner_batch_size, cfg.meta.micro_batch_size)  # fmt: skip
    for method in methods:
        if method == "base":  # the base model has nothing to adapt: its zero-shot score only
            rows += curve(peft_model, "base", fresh, [0], settings)
        elif method == "lora":
            shots = [n for n in cfg.eval.n_shots if n != 0 or "base" not in methods]
            rows += curve(peft_model, "lora", fresh, shots, settings)
        elif method == "full_data":
            rows += curve(peft_model, "full_data", fresh, [FULL_DATA_SHOTS], full_data)
        elif method == "constant":
            for setting, pools in evaluated.items():
                scored = constant_answer_rows(pools, list(cfg.eval.n_shots), cfg.eval.max_test)
                rows += [replace(row, setting=setting) for row in scored]
        elif method != "fomaml":
            for run in (r for r in runs if r.method == method):
                init = adapter_init(peft_model, run.weights)
                rows += curve(peft_model, method, init, list(cfg.eval.n_shots), settings, run.train_seed)
    if "lora" in methods and "base" in methods and 0 in cfg.eval.n_shots:
        # A fresh LoRA's B matrices are zero, so unadapted it computes exactly the base model: its 0-shot rows
        # are the base model's, scored once.
        rows += [replace(row, method="lora") for row in rows if row.method == "base"]
    return rows


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, frame.to_csv(index=False))
