"""Packed batches (examples end to end in one row, no padding) against left-padded ones, on tiny-random."""

import pytest
import torch
from numerics import assert_close_at_scale
from smoke import SMOKE

from metalora.config import ConfigError, load_config
from metalora.method.batch import IGNORE_INDEX
from metalora.method.loss import batch_loss, count_input_tokens, count_target_tokens
from metalora.training.parts import build_parts
from metalora.training.step import episode_gradients


def parts_for(*overrides: str):
    return build_parts(load_config(SMOKE, ["lora.dropout=0.0", *overrides]))


def support_pairs(parts, count: int = 4):
    episode = parts.sampler.sample(0)[0]
    task = parts.splits.train[episode.task].task
    return task, episode, [parts.encoder.encode(task, e) for e in episode.support[:count]]


def uneven_pairs(pairs):
    # Prompts of different lengths, so the padded batch has padding that packing removes.
    return [(prompt[i:], target) for i, (prompt, target) in enumerate(pairs)]


def test_a_packed_batch_lays_examples_end_to_end_with_positions_from_zero():
    parts = parts_for()
    _, _, pairs = support_pairs(parts, 3)
    pairs = uneven_pairs(pairs)
    batch = parts.encoder.pack(pairs)
    lengths = [len(p) + len(t) for p, t in pairs]
    assert batch["input_ids"][0].tolist() == [token for p, t in pairs for token in p + t]
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert batch["labels"][0].tolist() == [token for p, t in pairs for token in [IGNORE_INDEX] * len(p) + t]
    assert "attention_mask" not in batch  # the model derives the block-diagonal mask from the positions
    # Each kept position is the one before a target token.
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    targets = [starts[k] + len(p) + j for k, (p, t) in enumerate(pairs) for j in range(len(t))]
    assert (batch["logit_positions"] + 1).tolist() == targets
    assert count_input_tokens(batch) == sum(lengths)
    assert count_target_tokens(batch) == sum(len(t) for _, t in pairs)


def test_token_counts_stay_on_the_cpu_when_batches_go_to_another_device():
    parts = parts_for()
    _, _, pairs = support_pairs(parts, 3)
    pairs = uneven_pairs(pairs)
    on_cpu = {"padded": parts.encoder.collate(pairs), "packed": parts.encoder.pack(pairs)}
    # The meta device stands in for a GPU: data moves, and reading a count must not need it.
    parts.encoder.device = torch.device("meta")
    elsewhere = {"padded": parts.encoder.collate(pairs), "packed": parts.encoder.pack(pairs)}
    expected_targets = sum(len(t) for _, t in pairs)
    expected_inputs = sum(len(p) + len(t) for p, t in pairs)
    for layout, batch in elsewhere.items():
        assert batch["input_ids"].device.type == "meta", layout
        assert batch["target_tokens"].device.type == batch["input_tokens"].device.type == "cpu", layout
        assert count_target_tokens(batch) == expected_targets, layout
        assert count_input_tokens(batch) == expected_inputs, layout
        assert int((on_cpu[layout]["labels"] != IGNORE_INDEX).sum()) == expected_targets, layout


@pytest.mark.numerics
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_padded_batch(attention, nudge_lora_b):
    parts = parts_for()
    parts.model.set_attn_implementation(attention)  # eager is what second-order training uses
    nudge_lora_b(parts)
    _, _, pairs = support_pairs(parts)
    pairs = uneven_pairs(pairs)
    padded, packed = parts.encoder.collate(pairs), parts.encoder.pack(pairs)
    assert count_input_tokens(padded) == count_input_tokens(packed) < padded["input_ids"].numel()
    params = list(parts.shared.values())
    losses, grads = [], []
    for batch in (padded, packed):
        loss = batch_loss(parts.model, parts.shared, batch)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, params))
    assert_close_at_scale(losses[1], losses[0])
    assert any(g.abs().max() > 0 for g in grads[0])
    for want, got in zip(*grads, strict=True):
        assert_close_at_scale(got, want)
    # Each example alone: packing must not let one example attend to another.
    alone = [batch_loss(parts.model, parts.shared, parts.encoder.pack([pair])) for pair in pairs]
    weights = [len(t) for _, t in pairs]
    pooled = sum(loss * w for loss, w in zip(alone, weights, strict=True)) / sum(weights)
    assert_close_at_scale(pooled, losses[1])


def test_batches_are_packed_only_when_they_fit_the_token_bound():
    parts = parts_for()
    task, episode, pairs = support_pairs(parts, 2)
    examples = episode.support[:2]
    tokens = sum(len(p) + len(t) for p, t in pairs)
    fits = parts.encoder.batches(task, examples, 2, pack_tokens=tokens)
    too_long = parts.encoder.batches(task, examples, 2, pack_tokens=tokens - 1)
    never = parts.encoder.batches(task, examples, 2)
    assert "attention_mask" not in fits[0] and fits[0]["input_ids"].shape == (1, tokens)
    assert (
        too_long[0]["attention_mask"].shape
        == never[0]["attention_mask"].shape
        == (2, max(map(len, [p + t for p, t in pairs])))
    )


@pytest.mark.numerics
def test_meta_gradients_are_the_same_packed_and_padded(nudge_lora_b):
    grads, stats = [], []
    for pack_tokens in (0, 4096):
        parts = parts_for(f"speed.pack_tokens={pack_tokens}", "meta.inner_optimizer=adam")
        nudge_lora_b(parts)
        episodes = parts.sampler.sample(0)
        g, s = episode_gradients(parts, episodes, total_tasks=len(episodes))
        grads.append(g)
        stats.append(s)
    for want, got in zip(*grads, strict=True):
        assert_close_at_scale(got, want)
    for padded, packed in zip(*stats, strict=True):
        assert packed.tokens == padded.tokens
        assert packed.query_loss == pytest.approx(padded.query_loss, rel=1e-5)
        assert packed.last_inner_loss == pytest.approx(padded.last_inner_loss, rel=1e-5)


def test_packing_refuses_an_empty_prompt_and_a_negative_bound():
    parts = parts_for()
    _, _, pairs = support_pairs(parts, 2)
    with pytest.raises(ValueError, match="empty prompt"):
        parts.encoder.pack([pairs[0], ([], pairs[1][1])])
    with pytest.raises(ConfigError, match="speed.pack_tokens"):
        load_config(SMOKE, ["speed.pack_tokens=-1"])


def test_the_packing_benchmark_times_both_layouts(capsys):
    from metalora.benchmarks.packing import main

    assert main([*SMOKE, "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "padding share of the padded batches" in out
    assert "| padded |" in out and "| packed |" in out and "pair by pair: median" in out
