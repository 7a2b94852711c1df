"""Choose the tasks of an experiment and split their examples into disjoint pools, deterministically.

Meta-training tasks -> support pool / query pool. Held-out tasks -> adaptation pool / test set.
Shots for few-shot evaluation are drawn from the adaptation pool only, so no test example can leak
into adaptation. The split is a pure function of (seed, task name) and is recorded in the run dir.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from metalora.config import DataConfig
from metalora.embedded_suite import embedded_suite
from metalora.io import atomic_write_json
from metalora.tasks import Example, Task, TaskError, TaskSuite, load_suite_dir, merge_suites, select_tasks


@dataclass
class MetaPools:
    """A meta-training task's disjoint support and query pools."""

    task: Task
    support: list[Example]
    query: list[Example]


@dataclass
class HeldoutPools:
    """A held-out task's disjoint adaptation pool and test set."""

    task: Task
    adapt: list[Example]
    test: list[Example]


@dataclass
class Experiment:
    """The tasks of an experiment with their pools."""

    train: dict[str, MetaPools]
    heldout: dict[str, HeldoutPools]


def task_seed(seed: int, *parts: object) -> int:
    """A 64-bit seed derived from `seed` and any labels (stable across processes and machines).

    Args:
        seed: the master seed.
        parts: labels such as a task name, a step or a slot.

    Returns:
        A non-negative integer seed.
    """
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _shuffled(task: Task, seed: int) -> list[Example]:
    examples = list(task.examples)
    random.Random(task_seed(seed, "split", task.name)).shuffle(examples)
    return examples


def meta_pools(task: Task, max_samples: int, support_fraction: float, seed: int) -> MetaPools:
    """Split a meta-training task into support and query pools.

    Args:
        task: the task.
        max_samples: cap on examples used from the task.
        support_fraction: share of the used examples that goes to the support pool.
        seed: the experiment seed.

    Returns:
        Disjoint pools, each with at least one example.

    Raises:
        TaskError: the task has fewer than two examples.
    """
    used = _shuffled(task, seed)[:max_samples]
    if len(used) < 2:
        raise TaskError(f"task '{task.name}' has {len(used)} example(s); a support/query split needs at least 2")
    n_support = min(max(1, round(len(used) * support_fraction)), len(used) - 1)
    return MetaPools(task=task, support=used[:n_support], query=used[n_support:])


def heldout_pools(task: Task, n_test: int, seed: int) -> HeldoutPools:
    """Split a held-out task into an adaptation pool and a test set.

    Args:
        task: the task.
        n_test: test examples wanted; fewer are kept when the task is small, but at least half of
            the task always remains for adaptation.
        seed: the experiment seed.

    Returns:
        Disjoint pools.

    Raises:
        TaskError: the task has fewer than two examples.
    """
    examples = _shuffled(task, seed)
    if len(examples) < 2:
        raise TaskError(f"held-out task '{task.name}' has {len(examples)} example(s); it needs at least 2")
    n = min(n_test, len(examples) // 2)
    return HeldoutPools(task=task, test=examples[:n], adapt=examples[n:])


def load_suites(cfg: DataConfig) -> TaskSuite:
    """Load and merge the suites named in `cfg.suites` ("embedded" or directories)."""
    loaded = [(s, embedded_suite() if s == "embedded" else load_suite_dir(Path(s))) for s in cfg.suites]
    return merge_suites(loaded)


def build_experiment(cfg: DataConfig, seed: int) -> Experiment:
    """Load the suites, select tasks and split them.

    Args:
        cfg: data config (suites, task patterns, caps).
        seed: the experiment seed.

    Returns:
        The experiment's pools.

    Raises:
        TaskError: invalid suites, patterns that match nothing, or no meta-training task.
    """
    suite = load_suites(cfg)
    train, heldout = select_tasks(suite, cfg.train_tasks, cfg.heldout_tasks, cfg.exclude_tasks)
    if not train:
        raise TaskError("no meta-training tasks selected (check data.train_tasks and data.exclude_tasks)")
    return Experiment(
        train={n: meta_pools(suite.tasks[n], cfg.max_samples_per_task, cfg.support_fraction, seed) for n in train},
        heldout={n: heldout_pools(suite.tasks[n], cfg.n_test, seed) for n in heldout},
    )


def save_splits(experiment: Experiment, run_dir: str | Path) -> Path:
    """Record which example went to which pool in `run_dir/splits.json`.

    Returns:
        The path written.
    """
    record = {
        "train": {
            n: {"support": [e.id for e in p.support], "query": [e.id for e in p.query]}
            for n, p in experiment.train.items()
        },
        "heldout": {
            n: {"adapt": [e.id for e in p.adapt], "test": [e.id for e in p.test]} for n, p in experiment.heldout.items()
        },
    }
    path = Path(run_dir) / "splits.json"
    atomic_write_json(path, record)
    return path
