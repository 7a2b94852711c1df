"""Compiled decoder layers (`speed.compile_layers`) against the eager model, on tiny-random."""

import pytest
import torch
from numerics import assert_close_at_scale
from smoke import SMOKE

from metalora.config import ConfigError, load_config
from metalora.speed.compiled_layers import compile_decoder_layers, decoder_layers
from metalora.speed.dropout_masks import NumpyMaskDropout
from metalora.training.parts import build_parts
from metalora.training.step import episode_gradients


def meta_gradients_of(nudge_lora_b, *overrides: str):
    parts = build_parts(load_config(SMOKE, ["lora.dropout=0.0", *overrides]))
    nudge_lora_b(parts)
    episodes = parts.sampler.sample(0)
    return parts, episode_gradients(parts, episodes, total_tasks=len(episodes))


@pytest.mark.numerics
@pytest.mark.slow
def test_compiled_layers_give_the_eager_meta_gradients_and_statistics(nudge_lora_b):
    _, (eager_grads, eager_stats) = meta_gradients_of(nudge_lora_b)
    parts, (compiled_grads, compiled_stats) = meta_gradients_of(nudge_lora_b, "speed.compile_layers=true")
    layers = decoder_layers(parts.model)
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    assert any(float(g.abs().max()) > 0 for g in eager_grads)
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        assert_close_at_scale(b, a)
    for a, b in zip(eager_stats, compiled_stats, strict=True):
        assert (a.task, a.tokens) == (b.task, b.tokens)
        for field in ("first_inner_loss", "last_inner_loss", "query_loss"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-5), field


def test_lora_dropout_compiles_into_one_graph_with_seeded_masks():
    # fullgraph=True fails on any graph break, so numpy's generator must not be reached when compiling.
    dropout = torch.compile(NumpyMaskDropout(0.5).train(), fullgraph=True)
    x = torch.ones(400, 50)
    torch.manual_seed(3)
    first = dropout(x)
    torch.manual_seed(3)
    again = dropout(x)
    torch.manual_seed(4)
    other = dropout(x)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert set(first.unique().tolist()) == {0.0, 2.0}
    assert float((first == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_compile_layers_is_refused_where_it_does_not_apply():
    for overrides in (["meta.first_order=false"], ["speed.task_batched=true"]):
        with pytest.raises(ConfigError, match="speed.compile_layers"):
            load_config(SMOKE, ["speed.compile_layers=true", *overrides])
    load_config(SMOKE, ["speed.compile_layers=true", "meta.algorithm=fomaml"])


def test_a_model_without_decoder_layers_is_refused_by_name():
    with pytest.raises(ConfigError, match="speed.compile_layers: Sequential has no decoder layers"):
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
