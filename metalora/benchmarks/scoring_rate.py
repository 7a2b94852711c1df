"""Examples scored per second by few-shot evaluation: batched greedy generation against one example at a time.

    python -m metalora.benchmarks.scoring_rate [params.yaml ...] [a.b=value ...] [--task NAME] [--output DIR]

Scores one held-out task's test set (exact match: greedy decoding with a KV cache) at a fresh LoRA's weights,
once with `eval.batch_size` examples per batch and once one example at a time, and prints examples per second for
both, their ratio and the two scores (equal up to the rare argmax tie that padding can break). Defaults to the
demo settings (`params/base.yaml params/demo.yaml`); writes `scoring_rate.json` under --output with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from metalora.config import load_config, split_args
from metalora.data.splits import build_splits
from metalora.evaluation.scoring import score_task
from metalora.machine import describe_machine, machine_line
from metalora.modeling.build import load_base
from metalora.modeling.lora import attach_lora, lora_params
from metalora.modeling.models import pick_device


def _timed(run) -> tuple[float, float]:
    began = time.perf_counter()
    value = run().value
    return time.perf_counter() - began, value


def main(argv: list[str] | None = None) -> int:
    """Print the rates; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="*", help="parameter files and a.b=value overrides")
    parser.add_argument("--task", default="", help="the held-out task to score (default: the first)")
    parser.add_argument("--output", default="outputs/bench", help="directory for scoring_rate.json")
    args = parser.parse_args(argv)
    files, overrides = split_args(args.config)
    cfg = load_config(files or ["params/base.yaml", "params/demo.yaml"], overrides)
    device = pick_device(cfg.train.cpu)
    model, encoder = load_base(cfg, device)
    model = attach_lora(model, cfg.lora, cfg.train.seed, cfg.speed.cpu_dropout_masks).eval()
    params = {k: v.detach() for k, v in lora_params(model).items()}
    experiment = build_splits(cfg.data, cfg.eval.scenario)
    name = args.task or sorted(experiment.heldout)[0]
    pools = experiment.heldout[name]
    examples = pools.test[: cfg.eval.max_test]
    score_task(model, params, encoder, pools.task, examples[:2], 2)  # warm-up: kernels, caches
    batched_s, batched_value = _timed(lambda: score_task(model, params, encoder, pools.task, examples,
                                                         cfg.eval.batch_size))  # fmt: skip
    single_s, single_value = _timed(lambda: score_task(model, params, encoder, pools.task, examples, 1))
    machine = describe_machine()
    record = {
        "machine": machine, "model": cfg.model.name, "task": name, "examples": len(examples),
        "batch_size": cfg.eval.batch_size, "batched_examples_per_s": len(examples) / batched_s,
        "one_at_a_time_examples_per_s": len(examples) / single_s, "speedup": single_s / batched_s,
        "batched_score": batched_value, "one_at_a_time_score": single_value, "dtype": str(model.dtype),
    }  # fmt: skip
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scoring_rate.json").write_text(json.dumps(record, indent=2) + "\n")
    print(machine_line(machine))
    print(f"task {name}: {len(examples)} examples, batch {cfg.eval.batch_size}, {record['dtype']}")
    print("| scoring | examples/s | score |\n|---|---|---|")
    print(f"| batched | {record['batched_examples_per_s']:.1f} | {batched_value:.3f} |")
    print(f"| one at a time | {record['one_at_a_time_examples_per_s']:.1f} | {single_value:.3f} |")
    print(f"batched / one at a time: {record['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
