"""Episodes (task, support, query) as a pure function of (seed, step)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from metalora.data.splits import MetaPools, derived_seed
from metalora.data.tasks import Example, TaskError


@dataclass
class Episode:
    """One task of a meta-batch: its slot in the meta-batch, an RNG seed for its dropout, its examples."""

    task: str
    slot: int
    seed: int
    support: list[Example]
    query: list[Example]


class EpisodeSampler:
    """Deterministic meta-batches: `sample(step, rank, world_size)` depends on nothing else.

    Args:
        pools: meta-training tasks with their support and query pools.
        n_support: support examples per episode.
        n_query: query examples per episode.
        meta_batch_size: distinct tasks per meta-batch (all processes together).

    Raises:
        TaskError: the meta-batch is larger than the task pool, or a task's pools are too small.
    """

    def __init__(self, pools: dict[str, MetaPools], n_support: int, n_query: int, meta_batch_size: int, seed: int):
        if meta_batch_size > len(pools):
            raise TaskError(
                f"meta.meta_batch_size={meta_batch_size} is larger than the {len(pools)} meta-training task(s)"
            )
        for name, pool in pools.items():
            if len(pool.support) < n_support or len(pool.query) < n_query:
                raise TaskError(
                    f"task '{name}' has {len(pool.support)} support / {len(pool.query)} query examples; "
                    f"an episode needs n_support={n_support} and n_query={n_query} "
                    "(lower them or raise data.samples_per_task)"
                )
        self.pools = pools
        self.names = sorted(pools)
        self.n_support = n_support
        self.n_query = n_query
        self.meta_batch_size = meta_batch_size
        self.seed = seed

    def sample(self, step: int, rank: int = 0, world_size: int = 1) -> list[Episode]:
        """Return this process's episodes of meta-batch `step`.

        Args:
            rank: this process's index.
            world_size: number of processes; slot i of the meta-batch goes to process i % world_size.

        Returns:
            The episodes of this process (tasks distinct within the meta-batch).
        """
        chooser = random.Random(derived_seed(self.seed, "meta-batch", step))
        chosen = chooser.sample(self.names, self.meta_batch_size)
        episodes = []
        for slot, name in enumerate(chosen):
            if slot % world_size != rank:
                continue
            rng = random.Random(derived_seed(self.seed, "episode", step, slot))
            pool = self.pools[name]
            episodes.append(
                Episode(
                    task=name,
                    slot=slot,
                    seed=derived_seed(self.seed, "dropout", step, slot),
                    support=rng.sample(pool.support, self.n_support),
                    query=rng.sample(pool.query, self.n_query),
                )
            )
        return episodes
