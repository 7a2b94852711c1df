"""Episodes -> the batches the method forwards: the last step of the data side before the meta-gradient."""

from __future__ import annotations

from metalora.config import MetaConfig, SpeedConfig
from metalora.data.collation import Encoder
from metalora.data.episodes import Episode
from metalora.data.tasks import Task
from metalora.method.batch import EpisodeBatches
from metalora.method.meta import algorithm_of


def query_rows(meta: MetaConfig) -> int:
    """Rows per query forward pass: `query_batch_size`, capped by `micro_batch_size` when that is set (the query
    loss is a token-weighted mean over all its batches, so how the rows are grouped does not change it)."""
    return min(meta.query_batch_size, meta.micro_batch_size or meta.query_batch_size)


def episode_batches(
    episodes: list[Episode], tasks: dict[str, Task], encoder: Encoder, meta: MetaConfig, speed: SpeedConfig
) -> list[EpisodeBatches]:
    """Collate each episode's support steps and outer-loss batches as `meta` and `speed` lay them out.

    Support batches go in order, one per inner step, split into micro-batches when `meta.micro_batch_size` asks;
    query rows are grouped by length (the loss is a token-weighted mean, so order does not change it). An algorithm
    whose outer loss takes the support examples too (multi-task training) gets support and query together. With
    `speed.task_batched` every batch is padded and whole, the layout the task-batched path stacks across tasks.
    """
    pack_tokens = 0 if speed.task_batched else speed.pack_tokens
    micro_batch_size = 0 if speed.task_batched else meta.micro_batch_size
    loss_on_support = algorithm_of(meta).loss_on_support
    made = []
    for episode in episodes:
        task = tasks[episode.task]
        support = encoder.step_batches(task, episode.support, meta.inner_batch_size, micro_batch_size, pack_tokens)
        loss_examples = episode.support + episode.query if loss_on_support else episode.query
        query = encoder.batches(task, loss_examples, query_rows(meta), group_by_length=True, pack_tokens=pack_tokens)
        made.append(EpisodeBatches(episode.task, episode.seed, support, query))
    return made
