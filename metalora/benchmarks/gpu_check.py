"""`make gpu-check`: the one prepared check to run whenever a GPU is lent (under 8 minutes on one H200).

    python -m metalora.benchmarks.gpu_check [--arch DIR] [--out DIR]

With CUDA visible it runs, each step in its own process with its own time limit: the tests marked `gpu`, the
meta-step benchmark at the demo shapes (the embedded architecture) and at the paper's shapes (a 1.7B Llama
architecture, ~256-token examples, 4 tasks x 10 inner steps of batch 4, bf16), an end-to-end `metalora train` +
`metalora eval` smoke in bf16 on tiny-random, a two-process training run on the one GPU, and the examples scored
per second by batched against one-at-a-time generation. It writes one record
(`gpu_check_<time>.json`, plus each benchmark's own files) under --out and prints a summary table.

Without CUDA it says so and runs the CPU-side proxy only: operator calls per meta-step of the per-task loop and
of the task-batched path (what `bench --profile` counts) on tiny-random, then exits 0.

The GPU machine has no hub access and the embedded weights do not travel to it: export the architectures here
first (`python -m metalora.benchmarks.architectures .gpu/arch`) and carry `.gpu` along; the benchmark builds them
with seeded random weights (speed and memory do not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PY = sys.executable
BENCH = [PY, "-m", "metalora.cli", "bench"]
# About 230 filler tokens before each example's input: examples of the paper's ~256 tokens from the short suite.
FILLER = "the quick brown fox jumps. " * 45
LONG_PROMPT = 'data.prompt_template="{instruction}\\nContext: ' + FILLER + '\\nInput: {input}\\nOutput:"'
PAPER_SHAPES = [
    "meta.inner_steps=10", "meta.inner_batch_size=4", "meta.meta_batch_size=4", "meta.n_support=40",
    "meta.n_query=8", "data.max_prompt_tokens=320", LONG_PROMPT,
]  # fmt: skip


@dataclass
class Step:
    """One part of the check: a command and the seconds it may take."""

    name: str
    command: list[str]
    limit_s: int


@dataclass
class Outcome:
    """What a step did."""

    name: str
    status: str
    seconds: float
    tail: str


def gpu_steps(arch: Path, out: Path, scratch: Path) -> list[Step]:
    """The GPU check's steps, in the order they run (the cheap correctness checks first)."""
    smoke = ["params/base.yaml", "params/smoke.yaml", "model.dtype=bfloat16", f"train.output_dir={scratch}"]
    return [
        Step("tests marked gpu", [PY, "-m", "pytest", "-q", "-m", "gpu", "tests"], 60),
        Step("train + eval smoke, bf16", ["bash", "-c", " ".join([
            PY, "-m", "metalora.cli", "train", *smoke, "&&", PY, "-m", "metalora.cli", "eval", *smoke,
            "'eval.methods=[base,lora,metalora]'",
        ])], 80),  # fmt: skip
        Step("two processes on one GPU", [
            PY, "-m", "accelerate.commands.launch", "--num_processes", "2", "-m", "metalora.training.train", *smoke,
            "train.run_name=two",
        ], 70),  # fmt: skip
        Step("bench, demo shapes (135M architecture)", [
            *BENCH, "params/base.yaml", "params/demo.yaml", f"model.name={arch / 'base'}", "model.random_init=true",
            "--bf16", "--warmup", "2", "--steps", "5", "--meta-batches", "", "--repeats", "2",
            "--variants", "metalora,metalora-batched,naive,fomaml", "--output", str(out / "gpu_check_bench_demo"),
        ], 100),  # fmt: skip
        Step("scoring rate, demo shapes (135M architecture)", [
            PY, "-m", "metalora.benchmarks.scoring_rate", "params/base.yaml", "params/demo.yaml",
            f"model.name={arch / 'base'}", "model.random_init=true", "eval.batch_size=32", "eval.max_test=40",
            "--output", str(out / "gpu_check_scoring"),
        ], 50),  # fmt: skip
        Step("bench, paper shapes (1.7B architecture)", [
            *BENCH, "params/base.yaml", "params/demo.yaml", *PAPER_SHAPES, f"model.name={arch / 'llama-1.7b'}",
            "model.random_init=true", "--bf16", "--warmup", "1", "--steps", "3", "--meta-batches", "",
            "--variants", "metalora,metalora-batched,naive", "--output", str(out / "gpu_check_bench_paper"),
        ], 120),  # fmt: skip
    ]


def proxy_steps(out: Path) -> list[Step]:
    """The CPU-side proxy: operator calls per meta-step, per-task loop vs task-batched, on tiny-random."""
    return [
        Step("CPU proxy: operator calls per meta-step", [
            *BENCH, "params/base.yaml", "params/smoke.yaml", "--profile", "--warmup", "1", "--steps", "1",
            "--meta-batches", "", "--variants", "metalora,metalora-batched",
            "--output", str(out / "gpu_check_cpu_proxy"),
        ], 300),  # fmt: skip
    ]


def run_step(step: Step) -> Outcome:
    """Run one step in its own process; a failure or a timeout is recorded, and the check goes on."""
    began = time.perf_counter()
    try:
        done = subprocess.run(step.command, capture_output=True, text=True, timeout=step.limit_s)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        tail = (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        status = f"timed out after {step.limit_s} s"
        tail = str(err.stdout or "")[-3000:]
    return Outcome(step.name, status, time.perf_counter() - began, tail)


def summary_table(outcomes: list[Outcome]) -> str:
    """The outcomes as a Markdown table (printed at the end and kept in the record)."""
    lines = ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.1f} |" for o in outcomes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the check; the exit status is 0 when every step passed (always 0 without a GPU, after the proxy)."""
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=".gpu/arch", help="the directories metalora.benchmarks.architectures wrote")
    parser.add_argument("--out", default="docs/measurements", help="where the records go")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    if not gpu:
        print("gpu-check: no CUDA device is visible; running the CPU-side proxy only", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        steps = gpu_steps(Path(args.arch), out, Path(scratch)) if gpu else proxy_steps(out)
        outcomes = []
        for step in steps:
            print(f"gpu-check: {step.name} (at most {step.limit_s} s)", flush=True)
            outcomes.append(run_step(step))
    record = {
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "torch": torch.__version__,
        "steps": [asdict(o) for o in outcomes],
    }
    stamp = time.strftime("%Y%m%d_%H%M%S")
    (out / f"gpu_check_{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(summary_table(outcomes))
    return 0 if not gpu or all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
