"""What one forward pass keeps for its backward pass, the kit's loss beside the naive reference's.

    python -m metalora.benchmarks.saved_activations [params.yaml ...] [a.b=value ...] [--top 6]

Takes the first episode of the first meta-batch, and for its first inner-loop (support) batch and its
first query batch runs the forward pass of
- the kit: `batch_loss` (logits at the target positions only, the kit's LoRA dropout and projection);
- the reference: the model's own `labels` loss over full-vocabulary logits with torch's dropout masks,
  as the benchmark's naive meta-step computes it;
under `torch.autograd.graph.saved_tensors_hooks`, and sums the distinct storages autograd keeps for
the backward pass, leaving out the model's parameters (resident anyway). That sum is the activation
term A of the README's memory account (peak ≈ runtime + weights + A). Prints a Markdown table per
batch and the kit's largest kinds of kept tensor (dtype and shape), the first place to look when
cutting memory.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable

import torch

from metalora.config import load_config, split_args
from metalora.machine import describe_machine, machine_line
from metalora.method.loss import batch_loss
from metalora.speed.dropout_masks import torch_dropout_masks
from metalora.training.parts import build_parts


def saved_storages(forward: Callable[[], torch.Tensor], leave_out: set[int]) -> dict[int, tuple[int, str]]:
    """The distinct storages autograd keeps while `forward` runs.

    Args:
        forward: builds a differentiable result (its graph is dropped on return).
        leave_out: storage addresses not to count (the model's parameters).

    Returns:
        storage address -> (bytes, "dtype shape" of the first tensor seen on it).
    """
    kept: dict[int, tuple[int, str]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address not in leave_out and address not in kept:
            dtype = str(tensor.dtype).removeprefix("torch.")
            kept[address] = (storage.nbytes(), f"{dtype} {list(tensor.shape)}")
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return kept


def by_kind(kept: dict[int, tuple[int, str]]) -> Counter[str]:
    """Bytes per kind ("dtype shape") of kept tensor."""
    totals: Counter[str] = Counter()
    for size, kind in kept.values():
        totals[kind] += size
    return totals


def main(argv: list[str] | None = None) -> int:
    """Print the tables; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="*", help="YAML files then a.b=value overrides (default: base + demo)")
    parser.add_argument("--top", type=int, default=6, help="the kit's largest kinds of kept tensor to list")
    args = parser.parse_args(argv)
    files, overrides = split_args(args.config)
    cfg = load_config(files or ["params/base.yaml", "params/demo.yaml"], overrides)
    torch.manual_seed(cfg.train.seed)
    parts = build_parts(cfg)
    model = parts.model
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    episode = parts.sampler.sample(0)[0]
    task = parts.splits.train[episode.task].task
    support = parts.encoder.batches(task, episode.support, cfg.meta.inner_batch_size)[0]
    query = parts.encoder.batches(task, episode.query, cfg.meta.query_batch_size, group_by_length=True)[0]
    shared = {name: tensor.detach().requires_grad_(True) for name, tensor in parts.shared.items()}
    leave_out = parameters | {t.untyped_storage().data_ptr() for t in shared.values()}

    def reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch_dropout_masks():
            return model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss

    print(f"machine: {machine_line(describe_machine())}\nmodel: {cfg.model.name}, task {episode.task}\n")
    print("| batch | rows x tokens | kit MB | reference MB | kit / reference |\n|---|---|---|---|---|")
    kinds = {}
    for label, batch in (("support (inner loop)", support), ("query", query)):
        kit = saved_storages(lambda batch=batch: batch_loss(model, shared, batch), leave_out)
        naive = saved_storages(lambda batch=batch: reference(batch), leave_out)
        kit_mb, naive_mb = (sum(size for size, _ in kept.values()) / 2**20 for kept in (kit, naive))
        rows, tokens = batch["input_ids"].shape
        print(f"| {label} | {rows} x {tokens} | {kit_mb:.1f} | {naive_mb:.1f} | {kit_mb / naive_mb:.2f} |")
        kinds[label] = by_kind(kit)
    for label, totals in kinds.items():
        print(f"\nThe kit's largest kept tensors, {label} batch (summed over layers):\n")
        print("| dtype and shape | MB |\n|---|---|")
        for kind, size in totals.most_common(args.top):
            print(f"| {kind} | {size / 2**20:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
