"""Which initialisation each compared method is, and scoring them point by point.

Every method is planned as few-shot curves first (`planned_curves`): one per untrained method, one per training run
of a trained one. The plan says how many points the evaluation scores before any is scored (the progress bar's
total, `metalora info`'s count), and each scored point goes to the journal the moment it is done.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from metalora.config import TRAINED_METHODS, Config
from metalora.data.splits import EvalPools
from metalora.evaluation.fewshot import (
    AdaptSettings,
    CurveLabel,
    EvalRow,
    PointKey,
    Scorer,
    adapter_init,
    constant_answer_rows,
    evaluate_init,
    evaluation_points,
    snapshot_lora,
)
from metalora.evaluation.stats import SINGLE_TRAINING_SEED
from metalora.experiments.journal import PointJournal
from metalora.experiments.runs import TrainedRun
from metalora.modeling.build import load_base
from metalora.modeling.lora import attach_lora
from metalora.training.budgets import FULL_DATA_SHOTS
from metalora.training.checkpoints import load_full_weights

Evaluated = dict[str, dict[str, EvalPools]]


@dataclass
class Curve:
    """One few-shot curve to score: a method's initialisation (one training run of a trained method), the shot
    counts it is scored at and how it adapts to them."""

    method: str
    shots: list[int]
    settings: AdaptSettings
    run: TrainedRun | None = None

    @property
    def train_seed(self) -> int:
        """The training seed of the run scored, or the marker of an untrained method."""
        return self.run.train_seed if self.run is not None else SINGLE_TRAINING_SEED

    def label(self, setting: str) -> CurveLabel:
        """What the curve's rows in `setting` are labelled with."""
        return CurveLabel(self.method, setting, self.train_seed)


def adapt_settings(cfg: Config, full_data: bool = False) -> AdaptSettings:
    """How an initialisation adapts to its shots (`eval.adapt_*`), or the full-data reference to its whole pool."""
    meta = cfg.meta
    if full_data:
        steps, lr = cfg.baseline.full_data_steps, cfg.baseline.full_data_lr
    else:
        steps, lr = cfg.eval.adapt_steps, cfg.eval.adapt_lr
    return AdaptSettings(steps, lr, meta.inner_optimizer, meta.inner_batch_size, meta.micro_batch_size)


def planned_curves(cfg: Config, runs: list[TrainedRun]) -> list[Curve]:
    """The curves `cfg.eval.methods` asks for (`constant` has none: it adapts nothing and costs no scoring)."""
    settings, full_data = adapt_settings(cfg), adapt_settings(cfg, full_data=True)
    methods = list(cfg.eval.methods)
    curves = []
    for method in methods:
        if method == "base":  # the base model has nothing to adapt: its zero-shot score only
            curves.append(Curve("base", [0], settings))
        elif method == "lora":
            curves.append(Curve("lora", [n for n in cfg.eval.n_shots if n != 0 or "base" not in methods], settings))
        elif method == "full_data":
            curves.append(Curve("full_data", [FULL_DATA_SHOTS], full_data))
        elif method in TRAINED_METHODS:
            curves += [Curve(method, list(cfg.eval.n_shots), settings, run) for run in runs if run.method == method]
    return curves


def curve_points(curve: Curve, evaluated: Evaluated, seeds: int) -> list[PointKey]:
    """The journal keys of a curve's points over every evaluated setting and task."""
    return [curve.label(setting).key(*point) for setting, pools in evaluated.items()
            for point in evaluation_points(list(pools), curve.shots, seeds)]  # fmt: skip


def evaluate_methods(
    cfg: Config,
    evaluated: Evaluated,
    curves: list[Curve],
    journal: PointJournal,
    device: torch.device,
    points: set[PointKey],
) -> list[EvalRow]:
    """Score the curves' points among `points` (this process's or job's share), skipping those the journal already
    holds; returns their rows, the journal's included."""
    model, encoder = load_base(cfg, device)
    rows: list[EvalRow] = []

    def score(net: torch.nn.Module, init: dict[str, torch.Tensor], curve: Curve) -> None:
        scorer = Scorer(net, encoder, cfg.eval.max_test, cfg.eval.batch_size, cfg.eval.test_loss, cfg.eval.samples,
                        journal)  # fmt: skip
        for setting, pools in evaluated.items():
            label = curve.label(setting)
            mine = [point for point in evaluation_points(list(pools), curve.shots, cfg.eval.seeds)
                    if label.key(*point) in points]  # fmt: skip
            rows.extend(evaluate_init(scorer, label, init, curve.settings, pools, mine))

    for curve in (c for c in curves if c.method == "fomaml"):
        keys = [k for k in curve_points(curve, evaluated, cfg.eval.seeds) if k in points]
        if all(k in journal.finished for k in keys):  # nothing left to score: no full model to load
            rows.extend(journal.done(k) for k in keys)
            continue
        full_model, _ = load_base(cfg, device)
        load_full_weights(full_model, curve.run.weights)
        full_model.eval()
        score(full_model, {k: v.detach() for k, v in full_model.named_parameters()}, curve)
        del full_model
    # The fresh init of the `lora` and `full_data` methods: the one meta-training started from.
    peft_model = attach_lora(model, cfg.lora, cfg.train.seed, cfg.speed.cpu_dropout_masks)
    fresh = snapshot_lora(peft_model)
    for curve in (c for c in curves if c.method != "fomaml"):
        score(peft_model, fresh if curve.run is None else adapter_init(peft_model, curve.run.weights), curve)
    return rows


def derived_rows(cfg: Config, evaluated: Evaluated, scored: list[EvalRow]) -> list[EvalRow]:
    """The rows nothing scores, made from the evaluated tasks and the scored rows: the best constant answer
    (`constant`), and a fresh LoRA's 0-shot rows, which are the base model's."""
    methods = list(cfg.eval.methods)
    rows: list[EvalRow] = []
    if "constant" in methods:
        for setting, pools in evaluated.items():
            rows += constant_answer_rows(pools, list(cfg.eval.n_shots), cfg.eval.max_test, setting)
    if "lora" in methods and "base" in methods and 0 in cfg.eval.n_shots:
        # A fresh LoRA's B matrices are zero, so unadapted it computes exactly the base model: its 0-shot rows
        # are the base model's, scored once.
        rows += [replace(row, method="lora") for row in scored if row.method == "base"]
    return rows
