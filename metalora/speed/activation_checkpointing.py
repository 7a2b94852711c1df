"""Activation checkpointing of decoder layers that stays correct under `torch.func.functional_call`.

With `speed.activation_checkpointing` each decoder layer keeps only its inputs for the backward pass and
runs its forward again when the backward pass reaches it: activation memory drops from every layer's
intermediate tensors to one hidden-state tensor per layer, for about one more forward pass of compute.

transformers' own checkpointing (`gradient_checkpointing_enable`) replays a layer with whatever weights
the layer holds when the backward pass runs. The kit computes its losses under `functional_call` with
adapted LoRA weights that are swapped in only for the forward call, so a replay after the call has
returned would use the module's own (shared) weights and silently give gradients at the wrong point.
Here each layer's replay captures the tensors the layer holds at forward time and swaps them in again
for the recomputation; torch's checkpoint restores the random-number state, so the LoRA-dropout masks
(numpy's, seeded from torch's generator) are drawn again identically.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from metalora.speed.compiled_layers import required_decoder_layers


class _LayerCall(torch.nn.Module):
    """Holds a layer as a submodule so `functional_call` can swap its weights around a bound forward."""

    def __init__(self, layer: torch.nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.layer = layer
        self.bound_forward = forward

    def forward(self, *args: Any) -> Any:
        return self.bound_forward(*args)


def _checkpoint_with_forward_time_weights(layer: torch.nn.Module, forward: Callable[..., Any], *args: Any) -> Any:
    """transformers' checkpoint hook for one layer: `forward` is the layer's own forward with its keyword
    arguments bound; the weights it must be replayed with are the ones the layer holds now."""
    weights = {f"layer.{name}": tensor for name, tensor in layer.named_parameters(remove_duplicate=False)}

    def replay(*inputs: Any) -> Any:
        return functional_call(_LayerCall(layer, forward), weights, inputs)

    return checkpoint(replay, *args, use_reentrant=False, preserve_rng_state=True)


def checkpoint_decoder_layers(model: torch.nn.Module) -> int:
    """Turn on activation checkpointing for every decoder layer of `model` (training mode only).

    Args:
        model: a transformers causal LM, with or without LoRA attached.

    Returns:
        How many layers checkpoint their activations.

    Raises:
        ConfigError: the model has no layer built on transformers' decoder-layer base class.
    """
    layers = required_decoder_layers(model, "speed.activation_checkpointing", "checkpoint")
    for layer in layers:
        # transformers' layer base class calls this hook with the bound forward when training.
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(_checkpoint_with_forward_time_weights, layer)
    return len(layers)
