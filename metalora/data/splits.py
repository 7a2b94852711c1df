"""Choose the tasks of an experiment and split their examples into disjoint pools, deterministically.

Meta-training tasks -> support pool / query pool. Held-out tasks -> adaptation pool / test set.
Shots for few-shot evaluation are drawn from the adaptation pool only, so no test example can leak
into adaptation. In the seen scenario each training task also gives up a test set before its sample
budget is drawn. The split is a pure function of (data.split_seed, task name, example group) and is
recorded in the run dir.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from metalora.config import ALL_SAMPLES, DataConfig, support_query_sizes
from metalora.data.embedded_suite import embedded_suite
from metalora.data.tasks import (
    Example,
    Task,
    TaskError,
    TaskSuite,
    load_suite_dir,
    match_tasks,
    merge_suites,
    select_tasks,
)
from metalora.io import atomic_write_json

LOGGER = logging.getLogger("metalora")


@dataclass
class MetaPools:
    """A meta-training task's disjoint support and query pools."""

    task: Task
    support: list[Example]
    query: list[Example]


@dataclass
class EvalPools:
    """An evaluated task's disjoint adaptation pool and test set: a held-out task's, or in the seen scenario a
    training task's budget and the test set carved from it first."""

    task: Task
    adapt: list[Example]
    test: list[Example]


@dataclass
class Splits:
    """The selected tasks split into their pools: training tasks' support and query pools, evaluated tasks'
    adaptation pools and test sets.

    `seen` holds, in the seen scenario, each training task's test set with its budget as the adaptation
    pool; `budgets` the examples each training task may train on; `groups` the group of every grouped
    example of the selected tasks (by id), for the leak checks.
    """

    train: dict[str, MetaPools]
    heldout: dict[str, EvalPools]
    seen: dict[str, EvalPools] = field(default_factory=dict)
    # Examples dropped per task because an earlier line of the task held the same input and target.
    duplicates_dropped: dict[str, int] = field(default_factory=dict)
    scenario: str = "heldout"
    split_seed: int = 0
    budgets: dict[str, int | str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)


def derived_seed(seed: int, *parts: object) -> int:
    """A 64-bit seed derived from `seed` and any labels (stable across processes and machines).

    Args:
        parts: labels such as a task name, a step or a slot.

    Returns:
        A non-negative integer seed.
    """
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _ordered(task: Task, seed: int) -> list[Example]:
    """The task's examples in split order: seeded per task, or, when they carry groups, by a key of the group.

    Ordering grouped examples by their group's key puts translations of one item at the same rank in every
    task, so test sets carved from the front of each task hold the same items in every language.
    """
    examples = list(task.examples)
    if any(e.group is not None for e in examples):
        return sorted(examples, key=lambda e: derived_seed(seed, "group", e.group if e.group is not None else e.id))
    random.Random(derived_seed(seed, "split", task.name)).shuffle(examples)
    return examples


def _unique(task: Task) -> Task:
    """The task with repeated (input, target) pairs dropped, keeping each first line: two copies of one example
    could otherwise land in the adaptation pool and in the test set."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for example in task.examples:
        key = (example.input, example.target)
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return task if len(kept) == len(task.examples) else replace(task, examples=kept)


def _without_inputs(examples: list[Example], taken: set[str]) -> list[Example]:
    """Examples whose input is not in a test set: the same input with another target (a one-to-many relation)
    would otherwise be trained or adapted on while its twin is scored."""
    return [e for e in examples if e.input not in taken]


# Share of an evaluated task's (input, target) pairs that a training task holds, under any instruction, from which on
# the evaluated task is taken for a renamed copy of it. Tasks over the same inputs agree on some answers by chance
# (x mod 3 and x mod 6 on half of them); a copy agrees on all.
RENAMED_COPY_SHARE = 0.9


def _warn_copied_examples(pools: dict[str, MetaPools], evaluated: dict[str, list[Example]],
                          tasks: dict[str, Task]) -> None:  # fmt: skip
    """Warn about each evaluated task holding examples a training task trains on, the same instruction, input and
    target, and about each evaluated task that is a training task under another name and instruction (nearly all of
    its pairs are the training task's; an answer that merely coincides is no copy): its score would measure recall."""

    def copies(name: str, examples: list[Example]) -> set[tuple[str, str, str]]:
        return {(tasks[name].instruction, e.input, e.target) for e in examples}

    trained = {name: copies(name, p.support + p.query) for name, p in pools.items()}
    for name, examples in evaluated.items():
        own = copies(name, examples)
        for source, seen in trained.items():
            shared = len(own & seen)
            if shared and source != name:
                LOGGER.warning("task '%s': %d of its %d evaluated examples are training examples of task '%s' (the "
                               "same instruction, input and target: a copy scores recall, not transfer)", name, shared,
                               len(own), source)  # fmt: skip
    held = {name: {(e.input, e.target) for e in tasks[name].examples} for name in pools}
    for name, examples in evaluated.items():
        own_pairs = {(e.input, e.target) for e in examples}
        for source, pairs in held.items():
            if source == name or not own_pairs or tasks[source].instruction == tasks[name].instruction:
                continue  # the same instruction is the rule above's
            shared = len(own_pairs & pairs)
            if shared >= RENAMED_COPY_SHARE * len(own_pairs):
                LOGGER.warning("task '%s': %d of its %d evaluated (input, target) pairs are examples of training task "
                               "'%s' under another instruction: a renamed copy scores recall, not transfer", name,
                               shared, len(own_pairs), source)  # fmt: skip


def _without_groups(examples: list[Example], taken: set[str]) -> list[Example]:
    return [e for e in examples if e.group is None or e.group not in taken]


def _groups(examples: list[Example]) -> set[str]:
    return {e.group for e in examples if e.group is not None}


def _split_meta(task: Task, used: list[Example], support_fraction: float) -> MetaPools:
    if len(used) < 2:
        raise TaskError(f"task '{task.name}' has {len(used)} example(s); a support/query split needs at least 2")
    n_support, _ = support_query_sizes(len(used), support_fraction)
    return MetaPools(task=task, support=used[:n_support], query=used[n_support:])


def load_suites(cfg: DataConfig) -> TaskSuite:
    """Load and merge the suites named in `cfg.suites` ("embedded" or directories)."""
    loaded = [(s, embedded_suite() if s == "embedded" else load_suite_dir(Path(s))) for s in cfg.suites]
    return merge_suites(loaded)


def resolve_budgets(names: list[str], budget: int | str | dict) -> dict[str, int | str]:
    """Each training task's sample budget from `data.samples_per_task` (the first matching glob wins).

    Raises:
        TaskError: a glob that matches no training task, or a task no glob matches.
    """
    if not isinstance(budget, dict):
        return {name: budget for name in names}
    for pattern in budget:
        match_tasks(names, [pattern], f"data.samples_per_task.{pattern}")
    resolved = {}
    for name in names:
        matching = [value for pattern, value in budget.items() if fnmatch.fnmatchcase(name, pattern)]
        if not matching:
            raise TaskError(
                f"data.samples_per_task: no glob matches training task '{name}' (add a default such as '*': 100)"
            )
        resolved[name] = matching[0]
    return resolved


def build_splits(cfg: DataConfig, scenario: str = "heldout") -> Splits:
    """Load the suites, select tasks and split them, keeping every example group on one side.

    The order of the carving is what keeps it leak-free: test sets first (held-out tasks, and training
    tasks in the seen scenario), then held-out adaptation pools, then each training task's budget from
    what is left. Any group that lands in a test set or an adaptation pool is removed from every later
    pool of every task, so no item is trained on in one language and tested on in another.

    Raises:
        TaskError: invalid suites, patterns that match nothing, no training task, a budget larger than
            what a task has left, or a seen task too small for its test set.
    """
    suite = load_suites(cfg)
    train, heldout = select_tasks(suite, cfg.train_tasks, cfg.heldout_tasks, cfg.exclude_tasks)
    if not train:
        raise TaskError("no meta-training tasks selected (check data.train_tasks and data.exclude_tasks)")
    seed = cfg.split_seed
    unique = {name: _unique(suite.tasks[name]) for name in train + heldout}
    dropped = {n: len(suite.tasks[n].examples) - len(t.examples) for n, t in unique.items()}
    dropped = {n: count for n, count in dropped.items() if count}
    for name, count in dropped.items():
        LOGGER.warning("task '%s': dropped %d duplicate example(s) (an earlier line has the same input and target)",
                       name, count)  # fmt: skip
    ordered = {name: _ordered(unique[name], seed) for name in train + heldout}
    tests: dict[str, list[Example]] = {}
    for name in heldout:
        if len(ordered[name]) < 2:
            raise TaskError(f"held-out task '{name}' has {len(ordered[name])} example(s); it needs at least 2")
        tests[name] = ordered[name][: min(cfg.n_test, len(ordered[name]) // 2)]
    if scenario == "seen":
        for name in train:
            if len(ordered[name]) < cfg.n_test + 2:
                raise TaskError(
                    f"seen task '{name}' has {len(ordered[name])} examples: a test set of data.n_test={cfg.n_test} "
                    "must leave at least 2 for training (lower data.n_test or exclude the task)"
                )
            tests[name] = ordered[name][: cfg.n_test]
    taken = set().union(*(_groups(t) for t in tests.values()))
    test_inputs = {name: {e.input for e in test} for name, test in tests.items()}
    rest = {name: _without_inputs(_without_groups(ordered[name][len(tests.get(name, [])) :], taken),
                                  test_inputs.get(name, set())) for name in ordered}  # fmt: skip
    adapt = {name: rest[name][: cfg.max_adapt_pool or None] for name in heldout}
    taken |= set().union(*(_groups(a) for a in adapt.values()))
    budgets = resolve_budgets(train, cfg.samples_per_task)
    pools = {}
    for name in train:
        available = _without_groups(rest[name], taken)
        wanted = budgets[name]
        if wanted != ALL_SAMPLES and wanted > len(available):
            raise TaskError(
                f"task '{name}': data.samples_per_task gives it {wanted} examples, but it has {len(available)} "
                f"left for training (of {len(ordered[name])}; test sets and adaptation pools hold the rest)"
            )
        pools[name] = _split_meta(unique[name], available if wanted == ALL_SAMPLES else available[:wanted],
                                  cfg.support_fraction)  # fmt: skip
    _warn_copied_examples(pools, {name: tests[name] + adapt.get(name, []) for name in tests}, unique)
    return Splits(
        train=pools,
        heldout={n: EvalPools(unique[n], adapt=adapt[n], test=tests[n]) for n in heldout},
        seen={
            n: EvalPools(unique[n], adapt=p.support + p.query, test=tests[n])
            for n, p in pools.items()
            if scenario == "seen"
        },  # fmt: skip
        duplicates_dropped=dropped,
        scenario=scenario,
        split_seed=seed,
        budgets=budgets,
        groups={e.id: e.group for name in ordered for e in ordered[name] if e.group is not None},
    )


def save_splits(experiment: Splits, run_dir: str | Path) -> Path:
    """Record which example went to which pool in `run_dir/splits.json`.

    Returns:
        The path written.
    """
    record = {
        "scenario": experiment.scenario,
        "split_seed": experiment.split_seed,
        "train": {
            n: {
                "budget": experiment.budgets.get(n),
                "support": [e.id for e in p.support],
                "query": [e.id for e in p.query],
            }
            for n, p in experiment.train.items()
        },  # fmt: skip
        "heldout": {
            n: {"adapt": [e.id for e in p.adapt], "test": [e.id for e in p.test]} for n, p in experiment.heldout.items()
        },
        "seen": {n: {"test": [e.id for e in p.test]} for n, p in experiment.seen.items()},
    }
    path = Path(run_dir) / "splits.json"
    atomic_write_json(path, record)
    return path
