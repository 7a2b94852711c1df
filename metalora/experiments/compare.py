"""`metalora eval`: few-shot curves of every compared initialisation, with statistics and figures.

Writes into `<run_dir>/eval/`: results.csv (long form), summary.csv, significance.csv, per_task.csv,
efficiency.csv and their figures, and samples.parquet (every scored item's answer, `evaluation/samples.py`); then
logs the evaluation to the trackers of `train.log_with`. The jobs around it have their own modules: `runs` (where
each method's run is, training missing ones), `integrity` (leak, split and settings checks), `methods` (each
method's initialisation and the scoring loop) and `journal` (points kept as they are scored).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pandas as pd
from accelerate import PartialState
from accelerate.utils import gather_object

from metalora.config import Config, experiment_yaml, save_config
from metalora.data.splits import EvalPools, Splits, build_splits
from metalora.evaluation.fewshot import EvalRow, PointKey, rows_as_dicts
from metalora.evaluation.samples import SAMPLES_FILE
from metalora.evaluation.stats import per_task, significance, summarise
from metalora.experiments.integrity import (
    check_no_leak,
    check_run_record,
    check_same_split,
    check_shots,
    checksum_record,
)
from metalora.experiments.journal import JOURNAL, PointJournal, fingerprint
from metalora.experiments.methods import curve_points, derived_rows, evaluate_methods, planned_curves
from metalora.experiments.runs import EvaluationError, TrainedRun, config_for_method, ensure_trained
from metalora.io import atomic_directory, atomic_write_json, atomic_write_text
from metalora.modeling.models import pick_device
from metalora.reporting.efficiency import efficiency_table
from metalora.reporting.plots import efficiency_figure, few_shot_figure, per_task_figure
from metalora.reporting.trackers import log_evaluation
from metalora.training.budgets import FULL_DATA_SHOTS


def evaluated_pools(splits: Splits) -> dict[str, dict[str, EvalPools]]:
    """The pools scored per setting: held-out tasks always, training tasks' test sets in the seen scenario."""
    settings = {"heldout": splits.heldout, "seen": splits.seen}
    return {setting: pools for setting, pools in settings.items() if pools}


def run_evaluation(
    cfg: Config, train_missing: bool = False, shard: tuple[int, int] | None = None, score: bool = True
) -> Path:
    """Evaluate every method of `cfg.eval.methods` and write the tables and figures.

    The held-out tasks are scored few-shot; in the seen scenario the training tasks are scored on their
    own test sets as well (`setting` column). Every training seed of a trained method is scored.

    Args:
        cfg: the config (data, LoRA, eval and baseline settings; the run directory receives eval/).
        train_missing: train methods whose run directory holds no finished run.
        shard: (index, count): score only this job's share of the points (`deal_points`) into the journal, and
            write no tables (`metalora submit`'s evaluation jobs).
        score: False scores nothing: the tables are written from the journal once it holds every point
            (`metalora submit`'s final job).

    Returns:
        The eval directory (the journal's directory for a shard).

    Every scored point is journaled as soon as it is done (`experiments/journal.py`): run again after a kill,
    the evaluation scores only the points still missing, and its tables equal an uninterrupted run's.

    Raises:
        EvaluationError: nothing to evaluate, a missing run, a run trained on another split or budget, a
            run that saw evaluated data, shot counts larger than a task's adaptation pool, or (score=False)
            points the journal does not hold, named.
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
    if world > 1 and (shard is not None or not score):
        raise EvaluationError("under accelerate launch the processes share the evaluation among themselves: a "
                              "shard, or the tables alone, runs in one process")  # fmt: skip
    splits = build_splits(cfg.data, cfg.eval.scenario)
    evaluated = evaluated_pools(splits)
    if not evaluated:
        raise EvaluationError("no tasks to evaluate on: set data.heldout_tasks (glob patterns) or eval.scenario=seen")
    check_shots(cfg, evaluated)
    runs = ensure_trained(cfg, list(cfg.eval.methods), train_missing)
    expected: dict[str, Splits] = {}
    runs = [check_run_record(cfg, run) for run in runs]
    for run in runs:
        method_cfg = config_for_method(cfg, run.method, run.train_seed)
        key = repr(method_cfg.data.samples_per_task)
        if key not in expected:
            expected[key] = build_splits(method_cfg.data, cfg.eval.scenario)
        check_same_split(expected[key], run.method, run.run_dir)
        check_no_leak(splits, run.method, run.run_dir)
    device = state.device if state and state.device.type == "cuda" else pick_device(cfg.train.cpu)
    curves = planned_curves(cfg, runs)
    keys = [key for curve in curves for key in curve_points(curve, evaluated, cfg.eval.seeds)]
    index, count = shard if shard is not None else (rank, world)
    mine = deal_points(keys, index, count) if score else []
    digest = fingerprint(experiment_yaml(cfg), [checksum_record(r) for r in runs])
    # The main process sets aside the points of another evaluation before the others open their files.
    with state.main_process_first() if state else contextlib.nullcontext():
        journal = PointJournal(cfg.run_dir, digest, index, len(mine), show=rank == 0)
    if not score:
        journal.close()
        missing = [key for key in keys if key not in journal.finished]
        if missing:
            shown = "; ".join(" ".join(map(str, key)) for key in missing[:5])
            raise EvaluationError(
                f"{cfg.run_dir / JOURNAL} holds {len(keys) - len(missing)} of the evaluation's {len(keys)} points; "
                f"missing (setting method train_seed task shots seed): {shown}{' ...' * (len(missing) > 5)}; "
                "run the evaluation jobs that failed again (metalora submit resubmits what is missing)"
            )
        rows = [journal.finished[key] for key in keys]
    else:
        try:
            rows = evaluate_methods(cfg, evaluated, curves, journal, device, set(mine))
        finally:
            journal.close()
    if shard is not None:
        return journal.directory
    out = cfg.run_dir / "eval"
    if world > 1:
        rows = gather_object(rows)
        if rank != 0:
            return out
    rows += derived_rows(cfg, evaluated, rows)
    results = pd.DataFrame(rows_as_dicts(sorted(rows, key=_row_order)), columns=list(EvalRow.__dataclass_fields__))
    # Written whole or not at all: a failed evaluation leaves the previous eval/ as it was, and a new one
    # replaces it entirely, so no file of an older evaluation survives beside newer results.
    with atomic_directory(out) as tmp:
        save_config(cfg, tmp)
        # What was evaluated, as each run recorded it (its seed and steps), beside the evaluating config.
        atomic_write_json(tmp / "runs.json", [{"method": r.method, "train_seed": r.train_seed, "steps": r.steps,
                                               "run_dir": str(r.run_dir), "weights": str(r.weights)} for r in runs])
        write_statistics(results, tmp, cfg.eval.reference_method)
        if runs:
            efficiency = efficiency_table([(r.method, r.train_seed, r.run_dir) for r in runs])
            _write_csv(efficiency, tmp / "efficiency.csv")
            efficiency_figure(efficiency, tmp / "efficiency.png")
        if cfg.eval.samples:
            pd.DataFrame(journal.answers(keys)).to_parquet(tmp / SAMPLES_FILE, index=False)
    # The tables hold every point now: the journal has served its purpose.
    journal.remove()
    if cfg.train.log_with:
        log_evaluation(list(cfg.train.log_with), cfg.train.run_name, cfg.run_dir, out, _trained_steps(runs, cfg))
    return out


def _trained_steps(runs: list[TrainedRun], cfg: Config) -> int:
    """The training steps of the config's own run (where the trackers' curves end), else 0."""
    return next((r.steps or 0 for r in runs if r.run_dir == cfg.run_dir), 0)


def deal_points(keys: list[PointKey], index: int, count: int) -> list[PointKey]:
    """Share `index` of `count` of the evaluation's points, dealt like cards from the costliest down: the full-data
    reference, then the most shots (adapting costs more than scoring alone), then 0 shots.

    Every point is a pure function of its key, so the shares together score exactly what one process scores, no
    point twice, and any number of processes or jobs can share an evaluation (not only as many as it has tasks).
    Dealt in the plan's order instead, two shares of a curve at 0 and 5 shots would split into one of every 0-shot
    point and one of every 5-shot point.
    """
    costliest_first = sorted(keys, key=lambda key: (key[4] != FULL_DATA_SHOTS, -key[4]))  # stable within a count
    return costliest_first[index::count]


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


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, frame.to_csv(index=False))
