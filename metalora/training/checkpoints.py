"""Training checkpoints: small, standard, atomic, and loaded without pickle.

`checkpoints/step_<n>/` holds the shared weights (a peft adapter directory for metalora/reptile; the
full model as safetensors for fomaml), the meta-optimizer state as safetensors plus its JSON
hyper-parameters, `state.json` (step, seed, algorithm) and `checksums.json` (SHA-256 of every file,
verified on load: a flipped byte inside tensor data loads without complaint otherwise). The RNG state
is not stored: episodes and dropout are pure functions of (seed, step, slot), so the step is all a
resumed run needs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metalora.errors import MetaloraError
from metalora.io import (
    CHECKSUMS,
    ChecksumError,
    atomic_directory,
    atomic_write_json,
    verify_checksums,
    write_checksums,
)
from metalora.modeling.lora import load_adapter_into, save_adapter

STEP_DIR = re.compile(r"^step_(\d+)$")
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_GROUPS = "optimizer.json"
STATE = "state.json"
FULL_MODEL = "model"


class CheckpointError(MetaloraError):
    """A checkpoint is missing, incomplete or does not match the run."""


def _optimizer_to_files(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().cpu().contiguous()
        for index, entry in state["state"].items()
        for key, value in entry.items()
        if isinstance(value, torch.Tensor)
    }
    save_file(tensors, str(directory / OPTIMIZER_TENSORS))
    atomic_write_json(directory / OPTIMIZER_GROUPS, {"param_groups": state["param_groups"]})


def _optimizer_from_files(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    tensors = load_file(str(directory / OPTIMIZER_TENSORS))
    groups = json.loads((directory / OPTIMIZER_GROUPS).read_text())["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    algorithm: str,
    seed: int,
) -> Path:
    """Write `run_dir/checkpoints/step_<step>/` atomically.

    Args:
        step: meta-steps completed.
        model: the model holding the shared weights (peft model, or the base model for fomaml).
        algorithm: the meta-algorithm (decides the weight format).
        seed: the run's seed (checked on resume).

    Returns:
        The checkpoint directory.
    """
    target = Path(run_dir) / "checkpoints" / f"step_{step}"
    try:
        with atomic_directory(target) as tmp:
            if algorithm == "fomaml":
                model.save_pretrained(tmp / FULL_MODEL)
            else:
                save_adapter(model, tmp / "adapter")
            _optimizer_to_files(optimizer, tmp)
            atomic_write_json(tmp / STATE, {"step": step, "seed": seed, "algorithm": algorithm})
            write_checksums(tmp)
    except (OSError, SafetensorError) as err:  # a full disk reaches safetensors' writer as its own error type
        raise CheckpointError(f"{target}: cannot write the checkpoint ({err}); the earlier checkpoints are "
                              "untouched: free space and resume with --resume") from err  # fmt: skip
    return target


def load_full_weights(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Load a full model saved with `save_pretrained` (safetensors) into `model` in place.

    Args:
        model: a model of the same architecture.
        model_dir: the directory holding model.safetensors (a fomaml checkpoint or final model).

    Raises:
        CheckpointError: the file is missing, or its weights do not fit the model.
    """
    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: no full-model weights there")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    # A tied output embedding is saved once, so lm_head.weight may be absent from the file.
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise CheckpointError(
            f"{model_dir}: model weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints of a run (keep = 0 keeps all); returns the deleted ones."""
    root = Path(run_dir) / "checkpoints"
    if keep <= 0 or not root.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
    stale = [p for _, p in found[:-keep]]
    for path in stale:
        shutil.rmtree(path)
    return stale


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Return the checkpoint directory with the highest step, or None when there is none."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def load_checkpoint(
    directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, algorithm: str, seed: int
) -> int:
    """Restore weights and optimizer state from a checkpoint directory.

    Args:
        directory: a `step_<n>` directory.
        model: the model to load the shared weights into.
        algorithm: the run's algorithm (must match the checkpoint's).
        seed: the run's seed (must match the checkpoint's).

    Returns:
        The step to continue from.

    Raises:
        CheckpointError: a file is missing or corrupt, or the checkpoint belongs to another setup.
    """
    directory = Path(directory)
    if not (directory / CHECKSUMS).is_file():
        # Without the record a changed byte would load without a word: refused, as an evaluation refuses it.
        raise CheckpointError(f"{directory} has no {CHECKSUMS}, so its weights cannot be verified: restore the file, "
                              "or resume from an earlier checkpoint by moving this one aside")  # fmt: skip
    try:
        verify_checksums(directory)
    except ChecksumError as err:
        raise CheckpointError(f"corrupt checkpoint: {err}") from err
    try:
        state = json.loads((directory / STATE).read_text())
        if state["algorithm"] != algorithm or state["seed"] != seed:
            raise CheckpointError(
                f"{directory}: written by algorithm={state['algorithm']} seed={state['seed']}, "
                f"but this run has algorithm={algorithm} seed={seed}"
            )
        if algorithm == "fomaml":
            load_full_weights(model, directory / FULL_MODEL)
        else:
            load_adapter_into(model, directory / "adapter")
        _optimizer_from_files(optimizer, directory)
    except CheckpointError:
        raise
    except Exception as err:  # OS, JSON, key and safetensors errors all mean the same thing here
        raise CheckpointError(f"{directory}: missing or corrupt checkpoint: {err}") from err
    return int(state["step"])


def directory_bytes(path: Path) -> int:
    """Total size of the files under `path` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
