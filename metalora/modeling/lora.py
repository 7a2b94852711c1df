"""LoRA through peft: attach to a frozen base, expose the LoRA weights as a dict, save/load adapters.

Adapters are written in peft's own layout (`adapter_config.json` + `adapter_model.safetensors`),
so `peft.PeftModel.from_pretrained(base, directory)` loads them unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from metalora.config import ConfigError, LoraConfig
from metalora.errors import MetaloraError
from metalora.io import atomic_directory, verify_checksums, write_checksums
from metalora.speed.dropout_masks import use_numpy_dropout

LORA_MARKER = "lora_"
ALL_LINEAR = "all-linear"
# Fused projection -> the separate projections it holds, in families that fuse them (Phi-3).
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class AdapterError(MetaloraError):
    """An adapter directory is missing, incomplete or does not fit the model."""


def attach_lora(
    model: PreTrainedModel, cfg: LoraConfig, seed: int | None = None, cpu_dropout_masks: str = "numpy"
) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; every base weight is frozen.

    Args:
        cfg: rank, alpha, dropout and target module names.
        seed: seeds torch's RNG right before the random A matrices are drawn, so a fresh adapter is a
            function of the seed alone, whatever ran before in the process; None draws from the
            current RNG state.
        cpu_dropout_masks: where CPU dropout masks come from (`speed.cpu_dropout_masks`).

    Returns:
        The peft model. Its LoRA B matrices start at zero, so its outputs equal the base model's.
    """
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules(model, cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    if seed is not None:
        torch.manual_seed(seed)
    with peft_reads_deprecated_checkpointing_flag():
        peft_model = get_peft_model(model, peft_config)
    if cpu_dropout_masks == "numpy":
        use_numpy_dropout(peft_model)
    return peft_model


@contextmanager
def peft_reads_deprecated_checkpointing_flag() -> Iterator[None]:
    """Silence the one FutureWarning that peft's own model wrapping raises in transformers 5: peft reads the
    deprecated `is_gradient_checkpointing` property (transformers renamed it `is_activation_checkpointing`).
    The kit never reads it; every other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def target_modules(model: torch.nn.Module, names: list[str]) -> list[str] | str:
    """The module names LoRA attaches to in `model` for `lora.target_modules`.

    `all-linear` is peft's own spelling for every linear layer but the output projection. A name the model
    has is kept; a projection that this family fuses with its siblings (Phi-3's `qkv_proj` holds q, k and v,
    its `gate_up_proj` gate and up) becomes the fused module, so the same setting adapts the same
    projections in every family.

    Raises:
        ConfigError: a name that matches no linear layer of the model (the ones it has are listed).
    """
    if list(names) == [ALL_LINEAR]:
        return ALL_LINEAR
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    resolved: list[str] = []
    unknown = []
    for name in names:
        fused = next((f for f, parts in FUSED_PROJECTIONS.items() if name in parts and f in linear), None)
        found = name if name in linear else fused
        if found is None:
            unknown.append(name)
        elif found not in resolved:
            resolved.append(found)
    if unknown:
        raise ConfigError(
            f"bad value for 'lora.target_modules': {unknown} name no linear layer of this model (it has {linear}; "
            f"or use [{ALL_LINEAR}])"
        )
    return resolved


def lora_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the LoRA weights of `model` by parameter name (the module's own tensors, not copies).

    Returns:
        {name: parameter} for every parameter whose name contains "lora_".
    """
    return {name: p for name, p in model.named_parameters() if LORA_MARKER in name}


def save_adapter(model: PeftModel, directory: str | Path, params: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a peft adapter directory atomically.

    Args:
        model: the peft model (its config describes the adapter).
        directory: destination; replaced only once the new adapter is complete.
        params: LoRA weights to save by parameter name (e.g. adapted weights that live outside the
            module); None saves the module's own LoRA weights.

    Returns:
        The adapter directory.
    """
    weights = params if params is not None else lora_params(model)
    state = get_peft_model_state_dict(model, state_dict={k: v.detach() for k, v in weights.items()})
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_directory(directory) as tmp:
        model.peft_config["default"].save_pretrained(str(tmp))
        save_file(state, str(tmp / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        write_checksums(tmp)  # an extra file peft ignores; load_adapter_into verifies it
    return Path(directory)


def load_adapter_into(model: PeftModel, directory: str | Path) -> None:
    """Load an adapter's weights into the LoRA modules of `model` (no pickle: safetensors only).

    Args:
        model: a peft model with the same LoRA layout.
        directory: an adapter directory written by `save_adapter` or by peft.

    Raises:
        AdapterError: the directory or its weight file is missing or unreadable, or keys do not match.
    """
    path = Path(directory) / SAFETENSORS_WEIGHTS_NAME
    if not (Path(directory) / CONFIG_NAME).is_file() or not path.is_file():
        needed = f"{CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME}"
        raise AdapterError(f"{directory}: not an adapter directory (needs {needed})")
    try:
        verify_checksums(directory)
        state = load_file(str(path))
    except Exception as err:  # checksum and safetensors errors for changed, truncated or corrupt files
        raise AdapterError(f"{path}: cannot read adapter weights: {err}") from err
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if LORA_MARKER in k]
    if missing or result.unexpected_keys:
        raise AdapterError(
            f"{path}: adapter does not fit the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def load_adapter(base: PreTrainedModel, directory: str | Path, trainable: bool = True) -> PeftModel:
    """Wrap `base` with the adapter saved in `directory` through plain peft.

    Args:
        trainable: leave the LoRA weights trainable (for further adaptation).

    Returns:
        The peft model.

    Raises:
        AdapterError: the directory is not an adapter directory.
    """
    if not (Path(directory) / CONFIG_NAME).is_file():
        raise AdapterError(f"{directory}: not an adapter directory (no {CONFIG_NAME})")
    with peft_reads_deprecated_checkpointing_flag():
        return PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)
