"""The trained runs an evaluation compares: where each method's run lives, the config that trains it, and training
the missing ones (each in a child process).
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from metalora.config import ALL_SAMPLES, TRAINED_METHODS, Config, save_config
from metalora.data.splits import build_splits
from metalora.errors import MetaloraError
from metalora.training.budgets import multitask_plan
from metalora.training.checkpoints import STEP_DIR


class EvaluationError(MetaloraError):
    """A compared method cannot be evaluated (missing run, leaking split, no held-out tasks)."""


@dataclass
class TrainedRun:
    """One trained initialisation: a method's run (one training seed), possibly at an intermediate checkpoint."""

    method: str
    train_seed: int
    run_dir: Path
    # The adapter directory (or, for fomaml, the full-model directory) the evaluation loads.
    weights: Path
    # Named by eval.runs (any run or checkpoint the user points at) rather than found by the config's naming.
    explicit: bool = False
    # Meta-steps the weights were trained for, as the run recorded them (set by the integrity checks).
    steps: int | None = None


def training_seeds(cfg: Config) -> list[int]:
    """The training seeds of the replicates: train.seed, train.seed + 1, ... (train.seeds of them)."""
    return [cfg.train.seed + i for i in range(cfg.train.seeds)]


def method_run_dir(cfg: Config, method: str, train_seed: int | None = None) -> Path:
    """The run directory a trained method is read from.

    `eval.runs[method]` when given; else this config's own run directory for its `meta.algorithm`;
    else `<output_dir>/<run_name>-<method>`. With several training seeds, each replicate's directory
    is that name with `-seed<N>` appended.
    """
    if method in cfg.eval.runs:
        base = Path(cfg.eval.runs[method])
    elif method == cfg.meta.algorithm:
        base = cfg.run_dir
    else:
        base = Path(cfg.train.output_dir) / f"{cfg.train.run_name}-{method}"
    if cfg.train.seeds == 1 or train_seed is None:
        return base
    return base.with_name(f"{base.name}-seed{train_seed}")


def _checkpoint_root(path: Path) -> Path | None:
    """The run directory of an intermediate checkpoint `<run>/checkpoints/step_N`, else None."""
    if STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def _multitask_full_budget(cfg: Config) -> int:
    """Example-gradients of multitask_full: `baseline.multitask_full_epochs` passes over all its pooled data,
    and never less than the multi-task baseline's own budget."""
    everything = copy.deepcopy(cfg.data)
    everything.samples_per_task = ALL_SAMPLES
    pooled = sum(len(p.support) + len(p.query) for p in build_splits(everything, cfg.eval.scenario).train.values())
    return max(multitask_plan(cfg).example_gradients, math.ceil(cfg.baseline.multitask_full_epochs * pooled))


def config_for_method(cfg: Config, method: str, train_seed: int | None = None) -> Config:
    """The config that trains `method` (one replicate) into the directory `method_run_dir` names.

    multitask_full is the multi-task baseline with every non-test example of the training tasks
    (`data.samples_per_task=all`).
    """
    derived = copy.deepcopy(cfg)
    run_dir = method_run_dir(cfg, method, train_seed)
    derived.meta.algorithm = "multitask" if method == "multitask_full" else method
    if method == "multitask_full":
        derived.baseline.multitask_example_gradients = _multitask_full_budget(cfg)
        derived.data.samples_per_task = ALL_SAMPLES
    if train_seed is not None:
        derived.train.seed = train_seed
    derived.train.seeds = 1
    derived.train.output_dir = str(run_dir.parent)
    derived.train.run_name = run_dir.name
    return derived


def ensure_trained(cfg: Config, methods: list[str], train_missing: bool) -> list[TrainedRun]:
    """The trained runs of the trained methods among `methods` (every training seed), training missing ones
    when asked.

    Each missing run trains in a child process (`python -m metalora.training.train`), so its logged peak
    memory is its own and not that of whatever this process ran before. An `eval.runs` entry may name an
    intermediate checkpoint (`<run>/checkpoints/step_N`), which is evaluated as it is.

    Raises:
        EvaluationError: a run is missing (or unfinished) and `train_missing` is False, or its
            training failed.
    """
    runs = []
    for method in (m for m in methods if m in TRAINED_METHODS):
        for seed in training_seeds(cfg):
            run_dir = method_run_dir(cfg, method, seed)
            root = _checkpoint_root(run_dir)
            if root is not None:
                if not (run_dir / "state.json").is_file():
                    raise EvaluationError(f"eval.runs.{method}: {run_dir} is not a complete checkpoint")
                weights = run_dir / ("model" if method == "fomaml" else "adapter")
                runs.append(TrainedRun(method, seed, root, weights, explicit=True))
                continue
            if not (run_dir / "summary.json").is_file():
                if not train_missing:
                    raise EvaluationError(
                        f"eval.methods has '{method}' but {run_dir} holds no finished run: train it with "
                        f"`metalora train <params> meta.algorithm={method} train.run_name={run_dir.name}`, "
                        f"point eval.runs.{method} at a run, or pass --train-missing"
                    )
                _train_in_child(config_for_method(cfg, method, seed), resume=(run_dir / "checkpoints").is_dir())
            weights = run_dir / ("model" if method == "fomaml" else "adapter")
            runs.append(TrainedRun(method, seed, run_dir, weights, explicit=method in cfg.eval.runs))
    return runs


def _train_in_child(cfg: Config, resume: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        params = save_config(cfg, tmp)
        command = [sys.executable, "-m", "metalora.training.train", str(params), *(["--resume"] if resume else [])]
        child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        errors = []
        for line in child.stderr:  # echoed as it comes (progress), errors kept for the exception
            sys.stderr.write(line)
            if "error:" in line:
                errors.append(line.strip())
        status = child.wait()
    if status != 0:
        reason = errors[-1] if errors else "see its output above"
        raise EvaluationError(
            f"training {cfg.meta.algorithm} into {cfg.run_dir} failed (exit status {status}): {reason}"
        )
