"""Few-shot evaluation of an initialisation on held-out tasks.

For each task, shot count and seed: draw the shots from the task's adaptation pool (never from its
test set), adapt with the same `adapt` function as meta-training, then score the test set.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from metalora.data.collation import Encoder
from metalora.data.splits import EvalPools, derived_seed
from metalora.data.tasks import Example
from metalora.errors import MetaloraError
from metalora.evaluation.scoring import best_constant_answer, score_task, test_loss
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
    model: torch.nn.Module,
    method: str,
    init: Params,
    heldout: dict[str, EvalPools],
    encoder: Encoder,
    points: list[tuple[str, int, int]],
    settings: AdaptSettings,
    max_test: int,
    batch_size: int,
    with_test_loss: bool = True,
    finished: Callable[[str, int, int], EvalRow | None] | None = None,
    on_scored: Callable[[EvalRow], None] | None = None,
) -> list[EvalRow]:
    """Few-shot curves of one initialisation over the held-out tasks.

    Args:
        model: the model (LoRA attached when `init` holds LoRA weights).
        method: the name reported in the rows.
        heldout: held-out tasks with their adaptation pools and test sets.
        points: the (task, shots, seed) points to score, in order (`evaluation_points` gives a whole curve's;
            0 shots = no adaptation).
        settings: adaptation steps, learning rate, optimizer, batch size.
        max_test: test examples scored per task at most.
        batch_size: rows per scoring forward pass.
        with_test_loss: also score the test loss (else the rows' test_loss is NaN).
        finished: called with (task, shots, seed) before a point; a row it returns is taken as that point's,
            unscored (a resumed evaluation).
        on_scored: called with each newly scored row as soon as it is done (the caller then shows the progress).

    Returns:
        One row per (task, shots, seed).
    """
    rows = []
    model.eval()
    for task_name, shots_count, seed in tqdm(points, desc=f"eval {method}", leave=False, disable=on_scored is not None):
        earlier = finished(task_name, shots_count, seed) if finished is not None else None
        if earlier is not None:
            rows.append(earlier)
            continue
        pools = heldout[task_name]
        test = pools.test[:max_test]
        shots = draw_shots(pools, shots_count, seed)
        began = time.perf_counter()
        params = adapt_on_shots(model, init, encoder, pools, shots, settings, seed)
        seconds = time.perf_counter() - began
        metric = pools.task.metric if pools.task.options else "exact_match"
        row = EvalRow(method, task_name, shots_count, seed, metric, math.nan, len(test), seconds, math.nan,
                      finite=False)  # fmt: skip
        if all(bool(torch.isfinite(v).all()) for v in params.values()):
            metric, value = score_task(model, params, encoder, pools.task, test, batch_size)
            loss = test_loss(model, params, encoder, pools.task, test, batch_size) if with_test_loss else math.nan
            # Finite weights whose forward pass overflows score garbage (the argmax of NaN logits): a NaN test loss
            # flags them like weights that diverged.
            if not with_test_loss or math.isfinite(loss):
                row = EvalRow(method, task_name, shots_count, seed, metric, value, len(test), seconds, loss)
        rows.append(row)
        if on_scored is not None:
            on_scored(row)
    return rows


def evaluation_points(tasks: list[str], n_shots: list[int], seeds: int) -> list[tuple[str, int, int]]:
    """The (task, shots, seed) points of one few-shot curve, in scoring order: 0 shots once (nothing there depends
    on the seed, and repeated identical rows would inflate the n behind each interval), every other shot count once
    per seed."""
    return [(t, n, s) for t in tasks for n in n_shots for s in range(1 if n == 0 else seeds)]


def constant_answer_rows(heldout: dict[str, EvalPools], n_shots: list[int], max_test: int) -> list[EvalRow]:
    """The best constant answer on each task's scored test items (`best_constant_answer`), as method `constant`.

    Nothing is adapted, so the same value stands at every shot count: each comparison at a shot count then
    has the floor beside it.
    """
    rows = []
    for task_name, pools in heldout.items():
        test = pools.test[:max_test]
        metric, value = best_constant_answer(pools.task, test)
        rows += [EvalRow("constant", task_name, n, 0, metric, value, len(test), 0.0, math.nan) for n in n_shots]
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
