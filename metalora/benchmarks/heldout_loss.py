"""Does the meta-learned LoRA init adapt better than a fresh one? Held-out test loss after adapting.

    python -m metalora.benchmarks.heldout_loss [params.yaml ...] [a.b=value ...]

Meta-trains as configured (into `outputs/<train.run_name>`, resuming if it already has checkpoints),
then for every held-out task adapts both the meta-learned init and a fresh LoRA init on the same
`eval.n_shots[-1]` shots (from the adaptation pool) with the same inner loop, and prints the mean target
loss on the task's test set for each. The figures go to `outputs/bench/heldout_loss.json`.
"""

from __future__ import annotations

import sys
import time

from metalora.config import load_config, split_args
from metalora.data.splits import build_splits
from metalora.evaluation.fewshot import AdaptSettings, adapt_on_shots, adapter_init, draw_shots, snapshot_lora
from metalora.evaluation.scoring import test_loss
from metalora.io import atomic_write_json
from metalora.machine import describe_machine, machine_line
from metalora.modeling.build import load_base
from metalora.modeling.lora import attach_lora
from metalora.modeling.models import pick_device
from metalora.training.checkpoints import latest_checkpoint
from metalora.training.train import train


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    files, overrides = split_args(list(sys.argv[1:] if argv is None else argv))
    cfg = load_config(files, ["train.run_name=bench_heldout_loss", *overrides])
    began = time.perf_counter()
    run_dir = train(cfg, resume=latest_checkpoint(cfg.run_dir) is not None)
    train_seconds = time.perf_counter() - began

    experiment = build_splits(cfg.data, cfg.eval.scenario)
    model, encoder = load_base(cfg, pick_device(cfg.train.cpu))
    # The initialisation meta-training started from.
    model = attach_lora(model, cfg.lora, cfg.train.seed, cfg.speed.cpu_dropout_masks)
    model.eval()
    fresh = snapshot_lora(model)
    meta = adapter_init(model, run_dir / "adapter")
    settings = AdaptSettings(cfg.meta.inner_steps, cfg.meta.inner_lr, cfg.meta.inner_optimizer,
                             cfg.meta.inner_batch_size)  # fmt: skip
    n_shots = cfg.eval.n_shots[-1]
    rows = []
    print(f"| task | fresh LoRA init | meta-learned init |  (test loss after {n_shots} shots, {settings.steps} steps)")
    print("|---|---|---|")
    for name, pools in experiment.heldout.items():
        shots = draw_shots(pools, n_shots, cfg.train.seed)
        test = pools.test[: cfg.eval.max_test]
        losses = {}
        for label, init in (("fresh", fresh), ("meta", meta)):
            adapted = adapt_on_shots(model, init, encoder, pools, shots, settings, cfg.train.seed)
            losses[label] = test_loss(model, adapted, encoder, pools.task, test, cfg.eval.batch_size)
        rows.append({"task": name, **losses})
        print(f"| {name} | {losses['fresh']:.4f} | {losses['meta']:.4f} |")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("fresh", "meta")}
    wins = sum(r["meta"] < r["fresh"] for r in rows)
    print(f"| **mean** | **{mean['fresh']:.4f}** | **{mean['meta']:.4f}** |")
    machine = describe_machine()
    print(f"\nmeta-learned init lower on {wins}/{len(rows)} held-out tasks; meta-training {cfg.train.steps} steps "
          f"took {train_seconds:.0f}s; model={cfg.model.name}\nmachine: {machine_line(machine)}")  # fmt: skip
    atomic_write_json("outputs/bench/heldout_loss.json",
                      {"rows": rows, "mean": mean, "wins": wins, "train_seconds": train_seconds,
                       "steps": cfg.train.steps, "n_shots": n_shots, "model": cfg.model.name,
                       "machine": machine})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
