"""Packed against left-padded batches in the kit's meta-gradient, timed in alternation in one process.

    python -m metalora.benchmarks.packing [params.yaml ...] [a.b=value ...] [--steps 8] [--pack-tokens 256]

Each step's episodes get their meta-gradient twice, once with every batch padded (`speed.pack_tokens=0`)
and once packed, in alternating order, so this machine's drift between minutes hits both alike; the
pair's time ratio is reported per step. Also counts what the forward passes compute: real tokens, and
the positions of the padded batches (the padding share is what packing removes). Prints a Markdown
table; nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from metalora.benchmarks.meta_step import step_positions
from metalora.config import load_config, split_args
from metalora.data.episode_batches import episode_batches
from metalora.machine import describe_machine, machine_line
from metalora.method.meta import meta_gradients
from metalora.modeling.models import pick_device
from metalora.training.parts import build_parts


def main(argv: list[str] | None = None) -> int:
    """Print the comparison; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="*", help="YAML files then a.b=value overrides (default: base + demo)")
    parser.add_argument("--steps", type=int, default=8, help="meta-batches timed (after one untimed)")
    parser.add_argument("--pack-tokens", type=int, default=256, help="the packed side's speed.pack_tokens")
    args = parser.parse_args(argv)
    files, overrides = split_args(args.config)
    cfg = load_config(files or ["params/base.yaml", "params/demo.yaml"], ["meta.measure_gap=false", *overrides])
    torch.manual_seed(cfg.train.seed)
    parts = build_parts(cfg, pick_device(cfg.train.cpu))
    tasks = parts.tasks
    settings = {"padded": dataclasses.replace(cfg.speed, pack_tokens=0),
                "packed": dataclasses.replace(cfg.speed, pack_tokens=args.pack_tokens)}  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    for step in range(args.steps + 1):
        episodes = parts.sampler.sample(step)
        order = list(settings) if step % 2 == 0 else list(reversed(settings))
        for name in order:
            began = time.perf_counter()
            batches = episode_batches(episodes, tasks, parts.encoder, cfg.meta, settings[name])
            meta_gradients(parts.model, parts.shared, batches, cfg.meta, total_tasks=len(episodes))
            if step > 0:  # the first meta-batch warms both up
                seconds[name].append(time.perf_counter() - began)
    ratios = [padded / packed for padded, packed in zip(seconds["padded"], seconds["packed"], strict=True)]
    counts = [step_positions(parts.sampler.sample(s), tasks, parts.encoder, cfg) for s in range(1, args.steps + 1)]
    real, positions = sum(c[0] for c in counts), sum(c[1] for c in counts)
    print(f"machine: {machine_line(describe_machine())}")
    print(f"{args.steps} meta-batches; padding share of the padded batches: "
          f"{1 - real / positions:.1%} ({positions - real} of {positions} positions)\n")  # fmt: skip
    print("| batches | s per meta-gradient, median | range |\n|---|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} |")
    print(f"\npadded / packed time, pair by pair: median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
