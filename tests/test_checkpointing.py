"""Activation checkpointing (`speed.activation_checkpointing`) against the plain model, on tiny-random."""

import pytest
import torch
from numerics import assert_close_at_scale
from smoke import SMOKE

from metalora.config import ConfigError, load_config
from metalora.method.loss import batch_loss
from metalora.speed.activation_checkpointing import checkpoint_decoder_layers
from metalora.speed.compiled_layers import decoder_layers
from metalora.training.parts import build_parts
from metalora.training.step import episode_gradients


def parts_with(checkpointed: bool, *overrides: str):
    flag = f"speed.activation_checkpointing={str(checkpointed).lower()}"
    return build_parts(load_config(SMOKE, ["lora.dropout=0.1", flag, *overrides]))


def support_batch(parts):
    episode = parts.sampler.sample(0)[0]
    task = parts.splits.train[episode.task].task
    return parts.encoder.collate([parts.encoder.encode(task, e) for e in episode.support])


def loss_and_gradients_at_moved_weights(parts):
    # Weights away from the module's own: a replay with the module's weights would give other gradients.
    torch.manual_seed(0)
    moved = {k: (v + 0.05 * torch.randn_like(v)).detach().requires_grad_(True) for k, v in parts.shared.items()}
    torch.manual_seed(1)  # the same LoRA-dropout masks in both runs
    loss = batch_loss(parts.model, moved, support_batch(parts))
    return loss, torch.autograd.grad(loss, list(moved.values()))


@pytest.mark.numerics
def test_loss_and_gradients_at_swapped_in_weights_equal_the_plain_model():
    plain_loss, plain_grads = loss_and_gradients_at_moved_weights(parts_with(False))
    loss, grads = loss_and_gradients_at_moved_weights(parts_with(True))
    assert loss.item() == plain_loss.item()
    assert any(float(g.abs().max()) > 0 for g in plain_grads)
    for got, want in zip(grads, plain_grads, strict=True):
        assert_close_at_scale(got, want)


def test_transformers_own_checkpointing_replays_with_the_wrong_weights():
    # Why the kit has its own hook: transformers' replays the layer with the module's weights at backward
    # time, after functional_call has swapped the moved weights out again. If this starts to fail,
    # transformers replays correctly under functional_call and the kit's hook could be reconsidered.
    _, plain_grads = loss_and_gradients_at_moved_weights(parts_with(False))
    parts = parts_with(False)
    parts.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _, grads = loss_and_gradients_at_moved_weights(parts)
    assert any(not torch.allclose(got, want, atol=1e-4) for got, want in zip(grads, plain_grads, strict=True))


def test_each_layer_runs_again_in_the_backward_pass():
    parts = parts_with(True)
    calls = []
    for layer in decoder_layers(parts.model):
        # The replay stops once the last tensor the backward pass needs is recomputed (inside the MLP),
        # so count the attention blocks, which finish before it.
        layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    loss, _ = loss_and_gradients_at_moved_weights(parts)
    layers = len(decoder_layers(parts.model))
    assert layers > 0 and len(calls) == 2 * layers


@pytest.mark.numerics
@pytest.mark.parametrize("setting", ["meta.first_order=true", "meta.first_order=false", "meta.algorithm=fomaml"])
def test_meta_gradients_equal_the_plain_model(setting, nudge_lora_b):
    results = {}
    for checkpointed in (False, True):
        parts = parts_with(checkpointed, setting)
        nudge_lora_b(parts)
        episodes = parts.sampler.sample(0)
        torch.manual_seed(2)
        results[checkpointed] = episode_gradients(parts, episodes, total_tasks=len(episodes))
    (plain_grads, plain_stats), (grads, stats) = results[False], results[True]
    assert any(float(g.abs().max()) > 0 for g in plain_grads)
    for got, want in zip(grads, plain_grads, strict=True):
        assert_close_at_scale(got, want)
    for a, b in zip(plain_stats, stats, strict=True):
        assert (a.task, a.query_loss) == (b.task, pytest.approx(b.query_loss, rel=1e-6))


def test_activation_checkpointing_is_refused_where_it_is_untested():
    for overrides in (["speed.compile_layers=true"], ["speed.task_batched=true"]):
        with pytest.raises(ConfigError, match="speed.activation_checkpointing"):
            load_config(SMOKE, ["speed.activation_checkpointing=true", *overrides])


def test_a_model_without_decoder_layers_is_refused_by_name():
    with pytest.raises(ConfigError, match="speed.activation_checkpointing: Sequential has no decoder layers"):
        checkpoint_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
