"""The weight-first vocabulary projection: the same logits and gradients as nn.Linear, the same model."""

import pytest
import torch
from numerics import assert_close_at_scale
from smoke import SMOKE
from torch.utils._python_dispatch import TorchDispatchMode

from metalora.config import ModelConfig, load_config
from metalora.modeling.models import load_model
from metalora.speed.weight_first_logits import WeightFirstProjection, use_weight_first_projection
from metalora.training.parts import build_parts
from metalora.training.step import episode_gradients


class MatmulOperands(TorchDispatchMode):
    """Records the shapes of the two operands of every aten.mm call."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.numerics
@pytest.mark.parametrize("bias", [False, True])
def test_logits_and_gradients_equal_nn_linear(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 300, bias=bias)
    projection = WeightFirstProjection.from_linear(linear)
    assert projection.weight is linear.weight and projection.bias is linear.bias
    hidden = torch.randn(3, 5, 24, requires_grad=True)
    targets = torch.randint(0, 300, (15,))
    logits = projection(hidden)
    assert logits.shape == (3, 5, 300)
    assert_close_at_scale(logits, linear(hidden))
    grads = []
    for module in (linear, projection):
        loss = torch.nn.functional.cross_entropy(module(hidden).reshape(-1, 300), targets)
        grads.append(torch.autograd.grad(loss, [hidden, linear.weight]))
    for got, want in zip(grads[1], grads[0], strict=True):
        assert_close_at_scale(got, want)


def test_cpu_multiplies_weight_first_and_other_devices_keep_linear():
    linear = torch.nn.Linear(8, 40, bias=False)
    projection = WeightFirstProjection.from_linear(linear)
    with MatmulOperands() as cpu:
        projection(torch.randn(2, 3, 8))
    assert cpu.shapes == [((40, 8), (8, 6))]
    # The meta device stands in for a GPU: nn.Linear's own forward, hidden states on the left.
    on_meta = WeightFirstProjection.from_linear(torch.nn.Linear(8, 40, bias=False, device="meta"))
    with MatmulOperands() as meta:
        out = on_meta(torch.randn(2, 3, 8, device="meta"))
    assert out.shape == (2, 3, 40)
    assert meta.shapes == [((6, 8), (8, 40))]


@pytest.mark.numerics
def test_load_model_installs_it_and_keeps_the_model_as_it_was():
    plain, tokenizer = load_model(ModelConfig(name="tiny-random"), weight_first_logits=False)
    model, _ = load_model(ModelConfig(name="tiny-random"))
    assert type(plain.get_output_embeddings()) is torch.nn.Linear
    projection = model.get_output_embeddings()
    assert isinstance(projection, WeightFirstProjection)
    # Still tied to the input embeddings, and saved under the same names.
    assert projection.weight is model.get_input_embeddings().weight
    assert model.state_dict().keys() == plain.state_dict().keys()
    ids = torch.tensor([tokenizer.encode("3 + 4 = 7")])
    assert_close_at_scale(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    # A second call finds no plain nn.Linear to replace.
    assert not use_weight_first_projection(model)


@pytest.mark.numerics
def test_meta_gradients_and_statistics_equal_with_nn_linear(nudge_lora_b):
    results = []
    for weight_first in ("true", "false"):
        parts = build_parts(load_config(SMOKE, [f"speed.weight_first_logits={weight_first}"]))
        assert isinstance(parts.model.get_output_embeddings(), WeightFirstProjection) == (weight_first == "true")
        nudge_lora_b(parts)
        torch.manual_seed(0)  # the same dropout masks in both runs
        episodes = parts.sampler.sample(0)
        results.append(episode_gradients(parts, episodes, total_tasks=len(episodes)))
    (grads, stats), (reference_grads, reference_stats) = results
    assert any(float(g.abs().max()) > 0 for g in reference_grads)
    for got, want in zip(grads, reference_grads, strict=True):
        assert_close_at_scale(got, want)
    for got, want in zip(stats, reference_stats, strict=True):
        assert (got.task, got.tokens) == (want.task, want.tokens)
        for field in ("first_inner_loss", "last_inner_loss", "query_loss"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-6), field


def test_weight_first_projection_bench_prints_both_layouts(capsys):
    from metalora.benchmarks.vocab_projection import main

    assert main(["--hidden", "16", "--vocab", "64", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out
    row = next(line for line in out.splitlines() if line.startswith("| 3 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 8 and cells[3].endswith("x") and float(cells[7]) < 1e-5
