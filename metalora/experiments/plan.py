"""`metalora plan`: what `metalora eval --train-missing` will do before it does it.

The counts come from the functions the run itself uses: the training steps of every trained method and training
seed (`planned_steps` of the config that trains it) and the evaluation's points (`planned_curves`, `curve_points`).
With `--calibrate` the kit times a few training steps of each algorithm, and one evaluation point at each shot
count, on this machine with the config's own model and shapes, and extrapolates to a wall time.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from accelerate import Accelerator

from metalora.config import TRAINED_METHODS, Config
from metalora.data.splits import build_splits
from metalora.evaluation.fewshot import CurveLabel, PointKey, Scorer, evaluate_init, snapshot_lora
from metalora.experiments.compare import evaluated_pools
from metalora.experiments.journal import journaled_points
from metalora.experiments.methods import adapt_settings, curve_points, planned_curves
from metalora.experiments.runs import TrainedRun, config_for_method, method_run_dir, training_seeds
from metalora.modeling.build import load_base
from metalora.modeling.lora import attach_lora
from metalora.modeling.models import pick_device
from metalora.training.budgets import FULL_DATA_SHOTS, planned_steps
from metalora.training.checkpoints import STEP_DIR, latest_checkpoint
from metalora.training.parts import build_parts
from metalora.training.step import training_step

# Training steps timed per algorithm after one untimed warm-up step (allocation, first-call costs).
CALIBRATION_STEPS = 2


@dataclass
class TrainingRunPlan:
    """One training run an evaluation needs."""

    method: str
    train_seed: int
    run_dir: str
    steps: int
    finished: bool
    # Steps its latest checkpoint holds (all of them once finished).
    steps_done: int = 0

    @property
    def algorithm(self) -> str:
        """The training algorithm (multitask_full is the multi-task baseline on all the data)."""
        return "multitask" if self.method == "multitask_full" else self.method


@dataclass
class Plan:
    """Training runs and evaluation points of one evaluation, with measured costs once calibrated."""

    training: list[TrainingRunPlan]
    # (method, shots) -> scored points over every training seed, setting and task
    points: Counter[tuple[str, int]]
    # (method, shots) -> those of them already scored (in the evaluation's journal or its finished tables)
    points_done: Counter[tuple[str, int]] = field(default_factory=Counter)
    seconds_per_step: dict[str, float] = field(default_factory=dict)
    # shots -> seconds of one point (adaptation at those shots, then scoring); FULL_DATA_SHOTS for full_data
    seconds_per_point: dict[int, float] = field(default_factory=dict)

    def training_seconds(self) -> float | None:
        """Estimated seconds of the runs still to train (None before calibration)."""
        if not self.seconds_per_step:
            return None
        return sum(run.steps * self.seconds_per_step[run.algorithm] for run in self.training if not run.finished)

    def evaluation_seconds(self) -> float | None:
        """Estimated seconds of every evaluation point (None before calibration)."""
        if not self.seconds_per_point:
            return None
        return sum(self.seconds_per_point[shots] * n for (_, shots), n in self.points.items())


def build_plan(cfg: Config) -> Plan:
    """Count the training steps and evaluation points `cfg` asks for (reads the task suites, loads no model)."""
    training, runs = [], []
    for method in (m for m in cfg.eval.methods if m in TRAINED_METHODS):
        for seed in training_seeds(cfg):
            run_dir = method_run_dir(cfg, method, seed)
            steps = planned_steps(config_for_method(cfg, method, seed))
            finished = (run_dir / "summary.json").is_file()
            checkpoint = latest_checkpoint(run_dir)
            if finished or checkpoint is None:
                done = steps if finished else 0
            else:
                done = int(STEP_DIR.match(checkpoint.name).group(1))
            training.append(TrainingRunPlan(method, seed, str(run_dir), steps, finished, done))
            runs.append(TrainedRun(method, seed, run_dir, run_dir))
    evaluated = evaluated_pools(build_splits(cfg.data, cfg.eval.scenario))
    keys = [key for curve in planned_curves(cfg, runs) for key in curve_points(curve, evaluated, cfg.eval.seeds)]
    scored = journaled_points(cfg.run_dir) | tabled_points(cfg.run_dir)
    return Plan(training, Counter((k[1], k[4]) for k in keys), Counter((k[1], k[4]) for k in keys if k in scored))


def tabled_points(run_dir: Path) -> set[PointKey]:
    """The points of the finished evaluation tables in `run_dir/eval/`, if any."""
    path = run_dir / "eval" / "results.csv"
    if not path.is_file():
        return set()
    results = pd.read_csv(path)
    columns = ["setting", "method", "train_seed", "task", "n_shots", "seed"]
    return {(s, m, int(t), k, int(n), int(e)) for s, m, t, k, n, e in results[columns].itertuples(index=False)}


def calibrate(cfg: Config, plan: Plan) -> None:
    """Time each algorithm's training step and one evaluation point per shot count on this machine (fills `plan`).

    A trained method's points cost what a fresh LoRA's cost at the same shots (the init's values change no cost),
    so one point per shot count on a fresh LoRA times them all.
    """
    device = pick_device(cfg.train.cpu)
    accelerator = Accelerator(cpu=device.type != "cuda", mixed_precision=cfg.train.mixed_precision or None)
    for algorithm in sorted({run.algorithm for run in plan.training}):
        parts = build_parts(config_for_method(cfg, algorithm, cfg.train.seed), device)
        training_step(parts, 0, accelerator)
        began = time.perf_counter()
        for step in range(1, 1 + CALIBRATION_STEPS):
            training_step(parts, step, accelerator)
        plan.seconds_per_step[algorithm] = (time.perf_counter() - began) / CALIBRATION_STEPS
        del parts
    evaluated = evaluated_pools(build_splits(cfg.data, cfg.eval.scenario))
    setting = next(iter(evaluated))
    task = next(iter(evaluated[setting]))
    model, encoder = load_base(cfg, device)
    model = attach_lora(model, cfg.lora, cfg.train.seed, cfg.speed.cpu_dropout_masks)
    fresh = snapshot_lora(model)
    scorer = Scorer(model, encoder, cfg.eval.max_test, cfg.eval.batch_size, cfg.eval.test_loss)
    for shots in sorted({shots for _, shots in plan.points}):
        settings = adapt_settings(cfg, full_data=shots == FULL_DATA_SHOTS)
        began = time.perf_counter()
        evaluate_init(scorer, CurveLabel("calibration"), fresh, settings, evaluated[setting], [(task, shots, 0)])
        plan.seconds_per_point[shots] = time.perf_counter() - began


def describe(plan: Plan) -> str:
    """The plan as text: one line per training run, evaluation points per method and shots, and the estimates."""

    def clock(seconds: float | None) -> str:
        if seconds is None:
            return "not calibrated (add --calibrate)"
        return f"{int(seconds // 3600)}:{time.strftime('%M:%S', time.gmtime(seconds))}"

    lines = ["training runs (method, training seed, steps done / planned, run directory):"]
    lines += [f"  {r.method:<15} seed {r.train_seed:<4} {r.steps_done:>7} / {r.steps:<7} steps  {r.run_dir}"
              f"{'  (finished)' * r.finished}" for r in plan.training]  # fmt: skip
    if not plan.training:
        lines.append("  none (no trained method in eval.methods)")
    lines.append("evaluation points (method, shots: points scored / planned; shots -1 = the full-data reference):")
    lines += [f"  {method:<15} {shots:>4} shots: {plan.points_done[method, shots]:>6} / {n}"
              for (method, shots), n in sorted(plan.points.items())]  # fmt: skip
    lines.append(f"  {'total':<26} {sum(plan.points_done.values()):>6} / {sum(plan.points.values())}")
    if plan.seconds_per_step:
        rates = ", ".join(f"{a} {s:.2f} s/step" for a, s in plan.seconds_per_step.items())
        lines.append(f"calibration on this machine: {rates}")
    if plan.seconds_per_point:
        lines.append("  one point at " + ", ".join(f"{n} shots {s:.2f} s" for n, s in plan.seconds_per_point.items()))
    lines.append(f"estimated training wall time (runs not yet finished): {clock(plan.training_seconds())}")
    lines.append(f"estimated evaluation wall time: {clock(plan.evaluation_seconds())}")
    return "\n".join(lines)
