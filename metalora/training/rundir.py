"""One writer per run directory, and resumes that cannot silently change the experiment.

- A lock file (`.lock`, held with flock for the whole run) keeps a second `metalora train` out of a directory
  that a first one is writing.
- A fresh run refuses a directory that already holds another run's files.
- A resume compares the saved config with the new one: a change to the experiment (data, model, LoRA,
  algorithm, seeds) is refused with a readable diff; a change to an optimizer or step setting is applied and
  recorded in `resumes.jsonl`, never silently ignored.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metalora.config import Config, load_config
from metalora.training.checkpoints import CheckpointError, latest_checkpoint

LOCK = ".lock"
RESUMES = "resumes.jsonl"
# Another run's files: a fresh run into a directory holding one of these would mix two runs.
RUN_FILES = ("checkpoints", "config.yaml", "metrics.jsonl")
# Settings a resumed run may change: where the run lives and how long it goes on, how it is logged and
# computed (same results up to float rounding), and evaluation-only settings.
FREE_ON_RESUME = {
    "train.output_dir", "train.run_name", "train.resume", "train.steps", "train.seeds", "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_with", "train.cpu", "train.mixed_precision", "speed.compile_layers", "speed.activation_checkpointing",
    "model.cache_dir", "speed.weight_first_logits", "speed.cpu_dropout_masks", "speed.task_batched",
    "speed.pack_tokens", "meta.query_batch_size", "meta.measure_gap", "baseline.multitask_example_gradients",
    "baseline.multitask_full_epochs", "baseline.full_data_steps", "baseline.full_data_lr",
}  # fmt: skip
# Optimizer settings a resume applies to the restored optimizer (the change is recorded).
APPLIED_ON_RESUME = {
    "meta.meta_lr", "meta.weight_decay", "meta.max_grad_norm", "meta.reptile_step_size", "meta.inner_lr",
    "baseline.multitask_lr",
}  # fmt: skip


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the duration (created if missing).

    Raises:
        CheckpointError: another process holds it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOCK).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise CheckpointError(
                f"another process is writing into {run_dir} (it holds {run_dir / LOCK}); wait for it or choose "
                "another train.run_name"
            ) from err
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def refuse_used(run_dir: Path) -> None:
    """Refuse a fresh run into a directory that holds another run's files, or a link where one of them goes."""
    for name in RUN_FILES:
        if (run_dir / name).is_symlink():
            # Even a dangling link would be written through, outside the run directory.
            raise CheckpointError(f"{run_dir / name} is a symbolic link (to {(run_dir / name).readlink()}): a run "
                                  "writes its files inside its own directory; remove the link")  # fmt: skip
        if (run_dir / name).exists():
            if latest_checkpoint(run_dir) is None:
                raise CheckpointError(
                    f"{run_dir} already holds {name} from a run stopped before its first checkpoint: there is "
                    "nothing to resume; to start over, remove the directory, or choose another train.run_name"
                )
            raise CheckpointError(
                f"{run_dir} already holds {name} from another run: resume it with --resume "
                "(train.resume=true), choose another train.run_name, or remove the directory"
            )


def _flat(cfg: Config) -> dict[str, Any]:
    nested = OmegaConf.to_container(OmegaConf.structured(cfg))
    return {f"{group}.{key}": value for group, values in nested.items() for key, value in values.items()}


def resume_changes(run_dir: Path, cfg: Config) -> dict[str, list[Any]]:
    """The settings that differ from the run's saved config.yaml, as key -> [saved, new].

    Raises:
        CheckpointError: a change to the experiment itself, listing every such key as `key: saved -> new`; or no
            config.yaml to compare with.
    """
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        # Without the run's own record nothing could show that this resume changes the experiment.
        raise CheckpointError(f"{run_dir}: resume asked for, but the run's config.yaml is missing: the kit cannot tell "
                              "whether this config continues the same experiment (restore the file, or start over)")
    saved, new = _flat(load_config([saved_path])), _flat(cfg)
    # Where the run's jobs run (the cluster group) is no part of the experiment, and no change to record.
    changed = {key: [saved.get(key), value] for key, value in new.items()
               if saved.get(key) != value and not key.startswith("cluster.")}  # fmt: skip
    refused = {k: v for k, v in changed.items() if k not in FREE_ON_RESUME | APPLIED_ON_RESUME}
    if refused:
        diff = "; ".join(f"{key}: {old!r} -> {value!r}" for key, (old, value) in sorted(refused.items()))
        raise CheckpointError(
            f"cannot resume {run_dir}: the experiment changed ({diff}); train it as a new run "
            "(another train.run_name) instead"
        )
    return {k: v for k, v in changed.items() if k not in {"train.output_dir", "train.run_name", "train.resume"}}


def record_resume(run_dir: Path, step: int, changed: dict[str, list[Any]]) -> None:
    """Append what a resume changed to resumes.jsonl (read together with config.yaml, which holds the latest)."""
    with (run_dir / RESUMES).open("a") as handle:
        handle.write(json.dumps({"step": step, "changed": changed}) + "\n")
