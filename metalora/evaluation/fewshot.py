"""Few-shot evaluation of an initialisation on held-out tasks.

For each task, shot count and seed: draw the shots from the task's adaptation pool (never from its
test set), adapt with the same `adapt` function as meta-training, then score the test set.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from metalora.data.collation import Encoder
from metalora.data.splits import EvalPools, derived_seed
from metalora.data.tasks import Example, Task
from metalora.errors import MetaloraError
from metalora.evaluation.samples import ItemAnswer
from metalora.evaluation.scoring import TaskScore, best_constant_answer, score_task, test_losses
from metalora.method.adapt import Params, adapt
from metalora.modeling.lora import load_adapter_into, lora_params
from metalora.training.budgets import FULL_DATA_SHOTS


@dataclass
class AdaptSettings:
    """How an initialisation is adapted on the shots of a held-out task."""

    steps: int
    lr: float
    optimizer: str = "adam"
    batch_size: int = 4
    # Rows per forward/backward pass within a batch (`meta.micro_batch_size`; 0 = whole batches).
    micro_batch_size: int = 0


@dataclass
class EvalRow:
    """One measured point of a few-shot curve (the long-form results.csv row)."""

    method: str
    task: str
    n_shots: int
    seed: int
    metric: str
    value: float
    n_test: int
    adapt_seconds: float
    test_loss: float
    # heldout (a task never trained on) or seen (a training task's own test set).
    setting: str = "heldout"
    # The training seed of the evaluated initialisation; -1 for untrained methods.
    train_seed: int = -1
    # False when adaptation gave non-finite weights (e.g. a learning rate far too high): value and test_loss
    # are then NaN and the statistics leave the row out, counting it.
    finite: bool = True


# What identifies a scored point: setting, method, training seed, task, shots, evaluation seed.
PointKey = tuple[str, str, int, str, int, int]


@dataclass(frozen=True)
class CurveLabel:
    """Whose few-shot curve a row belongs to: the method, where its tasks come from (heldout or seen) and the
    training seed of the initialisation (-1 for an untrained method)."""

    method: str
    setting: str = "heldout"
    train_seed: int = -1

    def key(self, task: str, n_shots: int, seed: int) -> PointKey:
        """The point of this curve at (task, shots, seed)."""
        return (self.setting, self.method, self.train_seed, task, n_shots, seed)


class PointRecord(Protocol):
    """Where finished points are kept (`metalora.experiments.journal.PointJournal` is one)."""

    def done(self, key: PointKey) -> EvalRow | None:
        """The row of a point scored before, or None."""
        ...

    def record(self, row: EvalRow, answers: list[ItemAnswer]) -> None:
        """Keep a newly scored point and its per-item answers (empty when not kept)."""
        ...


@dataclass
class Scorer:
    """What scoring an initialisation needs besides the initialisation: the model (LoRA attached when the
    initialisations are LoRA weights) and its encoder, the test items scored per task at most, rows per scoring
    forward pass, whether the test loss is taken (else NaN), whether each point's per-item answers are kept, and
    where finished points are kept."""

    model: torch.nn.Module
    encoder: Encoder
    max_test: int
    batch_size: int
    test_loss: bool = True
    samples: bool = False
    record: PointRecord | None = None


def point_key(row: EvalRow) -> PointKey:
    """The point a row scored."""
    return CurveLabel(row.method, row.setting, row.train_seed).key(row.task, row.n_shots, row.seed)


def draw_shots(pools: EvalPools, n_shots: int, seed: int) -> list[Example]:
    """Draw `n_shots` examples from the task's adaptation pool only.

    Args:
        pools: the held-out task's adaptation pool and test set.
        n_shots: examples wanted; FULL_DATA_SHOTS (-1) means the whole adaptation pool (shuffled).

    Returns:
        The shots, in a seeded random order.

    Raises:
        MetaloraError: the adaptation pool is smaller than `n_shots`.
    """
    if n_shots > len(pools.adapt):
        raise MetaloraError(
            f"task '{pools.task.name}': {n_shots} shots asked for, but its adaptation pool has {len(pools.adapt)}"
        )
    count = len(pools.adapt) if n_shots == FULL_DATA_SHOTS else n_shots
    return random.Random(derived_seed(seed, "shots", pools.task.name, n_shots)).sample(pools.adapt, count)


def adapt_on_shots(
    model: torch.nn.Module,
    init: Params,
    encoder: Encoder,
    pools: EvalPools,
    shots: list[Example],
    settings: AdaptSettings,
    seed: int,
) -> Params:
    """Adapt `init` on `shots` (0 shots or 0 steps: `init` itself, unadapted)."""
    if not shots or settings.steps == 0:
        return init
    batches = encoder.step_batches(pools.task, shots, settings.batch_size, settings.micro_batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, "adapt", pools.task.name, len(shots)))
        adapted, _ = adapt(model, init, batches, settings.steps, settings.lr, optimizer=settings.optimizer)
    return {k: v.detach() for k, v in adapted.items()}


def evaluate_init(
    scorer: Scorer,
    label: CurveLabel,
    init: Params,
    settings: AdaptSettings,
    pools: dict[str, EvalPools],
    points: list[tuple[str, int, int]],
) -> list[EvalRow]:
    """Score one initialisation at `points`, (task, shots, seed) in order (`evaluation_points` gives a whole curve's;
    0 shots = no adaptation), adapting on each point's shots from the task's adaptation pool in `pools`. A point
    the scorer's record already holds is taken from it unscored; each newly scored one goes to it at once.
    Returns one row per point, labelled with `label`."""
    rows = []
    scorer.model.eval()
    progress = tqdm(points, desc=f"eval {label.method}", leave=False, disable=scorer.record is not None)
    for task, n_shots, seed in progress:
        earlier = scorer.record.done(label.key(task, n_shots, seed)) if scorer.record is not None else None
        if earlier is not None:
            rows.append(earlier)
            continue
        row, answers = score_point(scorer, label, init, settings, pools[task], n_shots, seed)
        if scorer.record is not None:
            scorer.record.record(row, answers)
        rows.append(row)
    return rows


def score_point(
    scorer: Scorer, label: CurveLabel, init: Params, settings: AdaptSettings, pools: EvalPools, n_shots: int, seed: int
) -> tuple[EvalRow, list[ItemAnswer]]:
    """Draw the shots, adapt, score the test set (at most `scorer.max_test` items): the point's row and, when the
    scorer keeps them, its per-item answers. Weights that diverged, or whose forward pass overflows, give a row
    flagged not finite with NaN scores and no answers."""
    test = pools.test[: scorer.max_test]
    shots = draw_shots(pools, n_shots, seed)
    began = time.perf_counter()
    params = adapt_on_shots(scorer.model, init, scorer.encoder, pools, shots, settings, seed)
    seconds = time.perf_counter() - began
    point = {"method": label.method, "task": pools.task.name, "n_shots": n_shots, "seed": seed,
             "n_test": len(test), "adapt_seconds": seconds, "setting": label.setting, "train_seed": label.train_seed}
    diverged = EvalRow(**point, metric=pools.task.metric if pools.task.options else "exact_match", value=math.nan,
                       test_loss=math.nan, finite=False)  # fmt: skip
    if not all(bool(torch.isfinite(v).all()) for v in params.values()):
        return diverged, []
    model, encoder, batch_size = scorer.model, scorer.encoder, scorer.batch_size
    scored = score_task(model, params, encoder, pools.task, test, batch_size)
    loss, item_losses = math.nan, [math.nan] * len(test)
    if scorer.test_loss:
        loss, item_losses = test_losses(model, params, encoder, pools.task, test, batch_size)
    # Finite weights whose forward pass overflows score garbage (the argmax of NaN logits): a NaN test loss flags
    # them like weights that diverged.
    if scorer.test_loss and not math.isfinite(loss):
        return diverged, []
    answers = item_answers(encoder, pools.task, test, scored, item_losses) if scorer.samples else []
    return EvalRow(**point, metric=scored.metric, value=scored.value, test_loss=loss), answers


def item_answers(
    encoder: Encoder, task: Task, test: list[Example], scored: TaskScore, losses: list[float]
) -> list[ItemAnswer]:
    """Each scored test item with the prompt as the model saw it (decoded from its tokens, cut as they were)."""
    return [ItemAnswer(item=i, example_id=example.id, prompt=encoder.tokenizer.decode(encoder.encode(task, example)[0]),
                       target=example.target, answer=answer, correct=correct, option_scores=options, loss=loss)
            for i, (example, answer, correct, options, loss) in enumerate(
                zip(test, scored.answers, scored.correct, scored.option_scores, losses, strict=True))]  # fmt: skip


def evaluation_points(tasks: list[str], n_shots: list[int], seeds: int) -> list[tuple[str, int, int]]:
    """The (task, shots, seed) points of one few-shot curve, in scoring order: 0 shots once (nothing there depends
    on the seed, and repeated identical rows would inflate the n behind each interval), every other shot count once
    per seed."""
    return [(t, n, s) for t in tasks for n in n_shots for s in range(1 if n == 0 else seeds)]


def constant_answer_rows(
    pools: dict[str, EvalPools], n_shots: list[int], max_test: int, setting: str = "heldout"
) -> list[EvalRow]:
    """The best constant answer on each task's scored test items (`best_constant_answer`), as method `constant`.

    Nothing is adapted, so the same value stands at every shot count: each comparison at a shot count then
    has the floor beside it.
    """
    rows = []
    for task_name, task_pools in pools.items():
        test = task_pools.test[:max_test]
        metric, value = best_constant_answer(task_pools.task, test)
        rows += [EvalRow("constant", task_name, n, 0, metric, value, len(test), 0.0, math.nan, setting=setting)
                 for n in n_shots]  # fmt: skip
    return rows


def snapshot_lora(model: torch.nn.Module) -> Params:
    """A detached copy of the model's current LoRA weights (e.g. the fresh init)."""
    return {k: v.detach().clone() for k, v in lora_params(model).items()}


def adapter_init(model: torch.nn.Module, directory: str | Path) -> Params:
    """Read an adapter directory as a LoRA parameter dict, leaving the model's own weights as they were."""
    before = snapshot_lora(model)
    load_adapter_into(model, directory)
    loaded = snapshot_lora(model)
    with torch.no_grad():
        for name, value in lora_params(model).items():
            value.copy_(before[name])
    return loaded


def rows_as_dicts(rows: list[EvalRow]) -> list[dict]:
    """Rows as plain dicts (for pandas or CSV)."""
    return [asdict(r) for r in rows]
