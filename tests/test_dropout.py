import pytest
import torch
import torch.nn.functional as F
from smoke import SMOKE
from torch.func import vmap

from metalora.config import ConfigError, LoraConfig, load_config
from metalora.modeling.lora import attach_lora
from metalora.speed.dropout_masks import NumpyMaskDropout, torch_dropout_masks, use_numpy_dropout


def test_numpy_masks_drop_p_and_keep_the_mean():
    dropout = NumpyMaskDropout(0.3)
    x = torch.ones(400, 2500)
    y = dropout(x)
    dropped = float((y == 0).float().mean())
    assert dropped == pytest.approx(0.3, abs=0.003)
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - dropout.effective_p)))
    assert float(y.mean()) == pytest.approx(1.0, abs=0.01)
    assert abs(dropout.effective_p - 0.3) <= 2**-17


def test_numpy_masks_follow_torch_seed_and_differ_between_calls():
    dropout = NumpyMaskDropout(0.5)
    x = torch.randn(8, 64)
    torch.manual_seed(3)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(first, second)


def test_numpy_masks_gradient_is_the_mask_and_eval_is_identity():
    dropout = NumpyMaskDropout(0.2)
    x = torch.randn(16, 32, requires_grad=True)
    y = dropout(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    scale = 1 / (1 - dropout.effective_p)
    assert torch.allclose(grad, (y != 0).float() * scale)
    assert torch.allclose(y, x.detach() * grad)
    dropout.eval()
    assert dropout(x) is x


def test_bf16_input_stays_bf16():
    assert NumpyMaskDropout(0.1)(torch.ones(4, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_torch_masks_inside_the_context_give_vmap_a_mask_per_task():
    dropout = NumpyMaskDropout(0.5)
    rows = torch.ones(3, 4096)
    torch.manual_seed(0)
    with torch_dropout_masks():
        mapped = vmap(dropout, randomness="different")(rows)
        torch.manual_seed(1)
        plain = dropout(rows[0])
    torch.manual_seed(1)
    assert torch.equal(plain, F.dropout(rows[0], 0.5, training=True))
    assert not torch.equal(mapped[0], mapped[1]) and not torch.equal(mapped[1], mapped[2])


def test_attach_lora_uses_numpy_masks_unless_told_torch(tiny):
    model, _ = tiny
    peft_model = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    numpy_modules = [m for m in peft_model.modules() if isinstance(m, NumpyMaskDropout)]
    assert numpy_modules and all(m.p == 0.1 for m in numpy_modules)
    assert not any(type(m) is torch.nn.Dropout for m in peft_model.modules())
    assert use_numpy_dropout(peft_model) == 0  # nothing left to replace


def test_torch_masks_keep_peft_dropout(tiny):
    model, _ = tiny
    peft_model = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1), cpu_dropout_masks="torch")
    assert any(type(m) is torch.nn.Dropout for m in peft_model.modules())
    assert not any(isinstance(m, NumpyMaskDropout) for m in peft_model.modules())


def test_unknown_mask_source_is_refused():
    with pytest.raises(ConfigError, match="speed.cpu_dropout_masks"):
        load_config(SMOKE, ["speed.cpu_dropout_masks=mt19937"])


def test_mask_benchmark_prints_one_timed_row_per_width(capsys):
    from metalora.benchmarks.dropout_masks import main
    from metalora.machine import cpu_model_name

    assert main(["--tokens", "2,3", "--hidden", "8", "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"machine: {cpu_model_name()} (")
    rows = [line for line in out.splitlines() if line.startswith("| 2×")]
    assert [row.split("|")[1].strip() for row in rows] == ["2×2×8", "2×3×8"]
    for row in rows:
        torch_us, numpy_us = (float(cell) for cell in row.split("|")[2:4])
        assert torch_us > 0 and numpy_us > 0


def test_profiler_counts_numpy_mask_time_as_random_numbers():
    from torch.profiler import profile

    from metalora.benchmarks.meta_step import op_category
    from metalora.speed.dropout_masks import PROFILE_LABEL

    with profile() as prof:
        NumpyMaskDropout(0.1)(torch.ones(64, 512))
    labelled = [e for e in prof.key_averages() if e.key == PROFILE_LABEL]
    assert labelled and labelled[0].self_cpu_time_total > 0
    assert op_category(PROFILE_LABEL) == "random numbers"
