"""Single-task splits: the reference the tests hold `build_splits` to (the library only splits whole suites)."""

from metalora.data.splits import EvalPools, MetaPools, _ordered, _split_meta
from metalora.data.tasks import Task, TaskError


def meta_pools(task: Task, max_samples: int, support_fraction: float, seed: int) -> MetaPools:
    """A training task's support and query pools from its first `max_samples` examples in split order."""
    return _split_meta(task, _ordered(task, seed)[:max_samples], support_fraction)


def heldout_pools(task: Task, n_test: int, seed: int) -> EvalPools:
    """A held-out task's test set (at most half the task) and adaptation pool, in split order."""
    examples = _ordered(task, seed)
    if len(examples) < 2:
        raise TaskError(f"held-out task '{task.name}' has {len(examples)} example(s); it needs at least 2")
    n = min(n_test, len(examples) // 2)
    return EvalPools(task=task, test=examples[:n], adapt=examples[n:])
