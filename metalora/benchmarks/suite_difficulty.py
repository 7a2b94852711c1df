"""How hard is the embedded suite for a model? Exact match on held-out tasks, zero-shot and after LoRA.

    python -m metalora.benchmarks.suite_difficulty [params.yaml ...] [a.b=value ...]

Uses the model and data of the config (default: the embedded model and the embedded suite), a fresh
LoRA adapted on `eval.n_shots` examples of each held-out task (the standard-LoRA baseline), and
prints a Markdown table; the rows go to `outputs/bench/suite_difficulty.json`.
"""

from __future__ import annotations

import sys
import time

import torch

from metalora.config import load_config, split_args
from metalora.data.splits import build_splits
from metalora.evaluation.fewshot import (
    AdaptSettings,
    CurveLabel,
    Scorer,
    evaluate_init,
    evaluation_points,
    rows_as_dicts,
    snapshot_lora,
)
from metalora.io import atomic_write_json
from metalora.machine import describe_machine, machine_line
from metalora.modeling.build import load_base
from metalora.modeling.lora import attach_lora
from metalora.modeling.models import pick_device


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    files, overrides = split_args(list(sys.argv[1:] if argv is None else argv))
    defaults = ["eval.n_shots=[0,50]", "eval.seeds=1", "eval.adapt_steps=25", "eval.adapt_lr=1e-3", "eval.max_test=30"]
    cfg = load_config(files, defaults + overrides)
    torch.manual_seed(cfg.train.seed)
    began = time.perf_counter()
    experiment = build_splits(cfg.data, cfg.eval.scenario)
    model, encoder = load_base(cfg, pick_device(cfg.train.cpu))
    model = attach_lora(model, cfg.lora, cpu_dropout_masks=cfg.speed.cpu_dropout_masks)
    settings = AdaptSettings(cfg.eval.adapt_steps, cfg.eval.adapt_lr, cfg.meta.inner_optimizer, 4)
    points = evaluation_points(list(experiment.heldout), cfg.eval.n_shots, cfg.eval.seeds)
    scorer = Scorer(model, encoder, cfg.eval.max_test, cfg.eval.batch_size)
    rows = evaluate_init(scorer, CurveLabel("lora"), snapshot_lora(model), settings, experiment.heldout, points)
    seconds = time.perf_counter() - began
    shots = cfg.eval.n_shots
    print(f"| task | family | {' | '.join(f'EM@{n}' for n in shots)} |")
    print(f"|---|---|{'---|' * len(shots)}")
    for task in experiment.heldout:
        values = [r.value for n in shots for r in rows if r.task == task and r.n_shots == n]
        family = experiment.heldout[task].task.family or "-"
        print(f"| {task} | {family} | {' | '.join(f'{v:.2f}' for v in values)} |")
    means = [sum(r.value for r in rows if r.n_shots == n) / len(experiment.heldout) for n in shots]
    print(f"| **mean** | | {' | '.join(f'**{m:.3f}**' for m in means)} |")
    machine = describe_machine()
    print(f"\nmodel={cfg.model.name} wall={seconds:.0f}s adapt_steps={cfg.eval.adapt_steps} "
          f"adapt_lr={cfg.eval.adapt_lr}\nmachine: {machine_line(machine)}")  # fmt: skip
    atomic_write_json("outputs/bench/suite_difficulty.json",
                      {"rows": rows_as_dicts(rows), "seconds": seconds, "model": cfg.model.name,
                       "machine": machine})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
