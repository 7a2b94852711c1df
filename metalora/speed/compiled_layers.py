"""torch.compile applied to each decoder layer of a model, for the training step.

Every decoder layer of a transformer runs the same code on tensors of the same shapes, so compiling
each layer's call gives one graph that all layers reuse (their weights are graph inputs): the compile
costs about one layer's worth, not the whole model's, and the fused graph replaces the many small
elementwise operations around the matmuls (norms, rotary embedding, activation, LoRA scaling and
dropout). Sizes are compiled as dynamic, because batch widths change from batch to batch.

Inside a compiled layer the LoRA-dropout masks come from the compiler's random numbers (seeded from
torch's generator, so runs stay reproducible), not from numpy (`metalora/speed/dropout_masks.py`).
"""

from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from metalora.config import ConfigError


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Return the model's decoder layers (transformers' layer base class marks them), in order."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def required_decoder_layers(model: torch.nn.Module, option: str, verb: str) -> list[torch.nn.Module]:
    """The model's decoder layers, for an option that works layer by layer.

    Args:
        model: a transformers causal LM, with or without LoRA attached.
        option: the config key that asked for it, named in the error.
        verb: what the option does to each layer ("compile", "checkpoint"), named in the error.

    Returns:
        The decoder layers, in order.

    Raises:
        ConfigError: the model has no layer built on transformers' decoder-layer base class.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"{option}: {type(model).__name__} has no decoder layers to {verb} "
            "(none derives from transformers' GradientCheckpointingLayer)"
        )
    return layers


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer of `model` in place; the compile itself runs at the first forward pass.

    Args:
        model: a transformers causal LM, with or without LoRA attached.

    Returns:
        How many layers were compiled.

    Raises:
        ConfigError: the model has no layer built on transformers' decoder-layer base class.
    """
    layers = required_decoder_layers(model, "speed.compile_layers", "compile")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
