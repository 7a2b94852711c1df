"""How much a plan gains from jobs: its wall time run in one process against submitted to SLURM.

    python -m metalora.benchmarks.submit_walltime OUT_DIR [params.yaml ...] [a.b=value ...]

First `metalora eval --train-missing` in one child process (all of this machine's CPUs), then the same plan
submitted to SLURM (`metalora submit --executor slurm`) into another output directory, timed until SLURM holds none
of its jobs; SLURM must be running (tests/slurm/local_slurm.sh start). Their scores must be equal, which
the benchmark checks (test losses differ by float rounding where the thread counts differ); the times, their ratio
and the machine go to OUT_DIR/walltime.json.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from metalora.config import load_config, split_args
from metalora.io import atomic_write_json
from metalora.jobs.submit import submit_plan
from metalora.machine import describe_machine, machine_line


def _timed(command: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def _wait_for(job_ids: list[str]) -> None:
    """Until SLURM holds none of `job_ids` (array members are named by their array's id)."""
    arrays = {job.split("_")[0] for job in job_ids}
    while True:
        queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
        if not {line.split("_")[0] for line in queued.split()} & arrays:
            return
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """Run both, check their tables agree, print and record the wall times; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    out, files, overrides = Path(args[0]), *split_args(args[1:])
    evaluate = [sys.executable, "-m", "metalora.cli", "eval", "--train-missing"]
    one = _timed([*evaluate, *files, *overrides, f"train.output_dir={out / 'one'}"])
    began = time.perf_counter()
    slurm_cfg = load_config(files, [*overrides, "cluster.executor=slurm", f"train.output_dir={out / 'slurm'}"])
    submission = submit_plan(slurm_cfg)
    ids = [job for jobs in submission.stages.values() for job in jobs]
    _wait_for(ids)
    slurm = time.perf_counter() - began
    tables = [pd.read_csv(next((out / kind).glob("*/eval/results.csv"))).drop(columns="adapt_seconds")
              for kind in ("one", "slurm")]  # fmt: skip
    same = tables[0].drop(columns="test_loss").equals(tables[1].drop(columns="test_loss"))
    loss_gap = float((tables[0]["test_loss"] - tables[1]["test_loss"]).abs().max())
    machine = describe_machine()
    record = {"one_process_s": round(one, 1), "slurm_s": round(slurm, 1), "speedup": round(one / slurm, 2),
              "scores_equal": same, "largest_test_loss_difference": loss_gap, "jobs": ids, "params": files,
              "overrides": overrides, "machine": machine}  # fmt: skip
    atomic_write_json(out / "walltime.json", record)
    print(f"{machine_line(machine)}\none process: {one:.1f} s; SLURM: {slurm:.1f} s ({one / slurm:.2f}x); "
          f"scores equal: {same}; test losses within {loss_gap:.1e}")  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
