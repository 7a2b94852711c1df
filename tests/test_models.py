import pytest
import torch
from numerics import assert_close_at_scale
from peft import PeftModel
from transformers import AutoConfig

from metalora.config import LoraConfig, ModelConfig
from metalora.modeling.lora import AdapterError, attach_lora, load_adapter, load_adapter_into, lora_params, save_adapter
from metalora.modeling.models import ModelLoadError, load_model


def test_tiny_random_is_deterministic_and_pads_left(tiny):
    model, tokenizer = tiny
    again, _ = load_model(ModelConfig(name="tiny-random"))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert tokenizer.decode(tokenizer("héllo 42")["input_ids"]) == "héllo 42"


def test_unreachable_hub_id_says_so_and_suggests_embedded():
    with pytest.raises(ModelLoadError, match="embedded"):
        load_model(ModelConfig(name="no-such-org/no-such-model"))


def test_a_gated_repository_shows_the_hubs_own_reason(monkeypatch):
    import transformers

    def gated(*args, **kwargs):
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it.")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", gated)
    with pytest.raises(ModelLoadError, match=r"access a gated repo.*log in.*accept its licence"):
        load_model(ModelConfig(name="meta-llama/Llama-3.2-1B"))


def test_loading_options_pass_through(tiny, tmp_path, monkeypatch):
    eager, _ = load_model(ModelConfig(name="tiny-random", attn_implementation="eager"))
    assert eager.config._attn_implementation == "eager"
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return original(name, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(ModelConfig(name=str(tmp_path), revision="main"))
    assert seen["revision"] == "main" and seen["trust_remote_code"] is False


def test_lora_attach_freezes_base_and_fresh_adapter_is_a_no_op(tiny):
    model, tokenizer = tiny
    ids = tokenizer(["2 + 2 =", "hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**ids).logits.clone()
    peft_model = attach_lora(model, LoraConfig(r=4, alpha=8))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_params(peft_model)) and trainable
    assert all("lora_" in n for n in trainable)
    peft_model.eval()
    with torch.no_grad():
        after = peft_model(**ids).logits
    assert torch.equal(before, after)


def _perturb(peft_model):
    with torch.no_grad():
        for p in lora_params(peft_model).values():
            p.copy_(torch.randn_like(p) * 0.1)


@pytest.mark.numerics
def test_adapter_round_trip_through_plain_peft(tiny, tmp_path):
    model, tokenizer = tiny
    peft_model = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    _perturb(peft_model)
    peft_model.eval()
    ids = tokenizer(["a b c"], return_tensors="pt")
    with torch.no_grad():
        expected = peft_model(**ids).logits
    save_adapter(peft_model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh_base, _ = load_model(ModelConfig(name="tiny-random"))
    loaded = PeftModel.from_pretrained(fresh_base, str(tmp_path / "adapter"))
    loaded.eval()
    with torch.no_grad():
        assert_close_at_scale(loaded(**ids).logits, expected)
    again = load_adapter(load_model(ModelConfig(name="tiny-random"))[0], tmp_path / "adapter")
    assert set(lora_params(again)) == set(lora_params(peft_model))


def test_save_adapter_from_a_params_dict_and_load_into(tiny, tmp_path):
    model, _ = tiny
    peft_model = attach_lora(model, LoraConfig(r=4, alpha=8))
    moved = {k: v.detach() + 1.0 for k, v in lora_params(peft_model).items()}
    save_adapter(peft_model, tmp_path / "a", params=moved)
    target = attach_lora(load_model(ModelConfig(name="tiny-random"))[0], LoraConfig(r=4, alpha=8))
    load_adapter_into(target, tmp_path / "a")
    for name, p in lora_params(target).items():
        assert torch.equal(p, moved[name]), name


def test_missing_or_corrupt_adapter_is_a_named_error(tiny, tmp_path):
    model, _ = tiny
    peft_model = attach_lora(model, LoraConfig(r=4, alpha=8))
    with pytest.raises(AdapterError, match="not an adapter directory"):
        load_adapter_into(peft_model, tmp_path / "missing")
    save_adapter(peft_model, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="cannot read adapter weights"):
        load_adapter_into(peft_model, tmp_path / "a")


@pytest.mark.slow
def test_embedded_model_answers_a_simple_prompt():
    model, tokenizer = load_model(ModelConfig(name="embedded"))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_embedded_model_is_a_plain_saveable_model(tmp_path):
    # FOMAML checkpoints save the whole model: a GGUF quantization entry left in the cached config
    # would make save_pretrained refuse.
    model, _ = load_model(ModelConfig(name="embedded"))
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_random_init_needs_only_config_and_tokenizer(tiny, tmp_path):
    model, tokenizer = tiny
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    cfg = ModelConfig(name=str(tmp_path), random_init=True, dtype="bfloat16")
    first, loaded_tokenizer = load_model(cfg)
    second, _ = load_model(cfg)
    assert type(first) is type(model) and loaded_tokenizer.vocab_size == tokenizer.vocab_size
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), name
    # Without random_init the same directory is refused: it holds no weights.
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(ModelConfig(name=str(tmp_path)))


def test_architecture_presets_load_with_random_init(tiny, tmp_path):
    from metalora.benchmarks.architectures import PRESETS, export_architectures

    model, tokenizer = tiny
    model.config.save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    written = export_architectures(tmp_path / "arch", str(tmp_path / "source"))
    assert [p.name for p in written] == list(PRESETS)
    base, _ = load_model(ModelConfig(name=str(tmp_path / "arch" / "base"), random_init=True))
    assert base.config.hidden_size == model.config.hidden_size
    wide = AutoConfig.from_pretrained(tmp_path / "arch" / "llama-1.7b")
    assert (wide.hidden_size, wide.num_hidden_layers) == (2048, 24)


def test_auto_dtype_is_bfloat16_on_a_gpu_with_float32_adapters():
    from metalora.modeling.models import resolve_dtype

    assert resolve_dtype("auto", cuda=True) == torch.bfloat16 and resolve_dtype("auto", cuda=False) == torch.float32
    assert resolve_dtype("float16", cuda=True) == torch.float16
    model, _ = load_model(ModelConfig(name="tiny-random", dtype="bfloat16"))
    peft_model = attach_lora(model, LoraConfig(r=2, alpha=4))
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {t.dtype for t in lora_params(peft_model).values()} == {torch.float32}
    assert load_model(ModelConfig(name="tiny-random"), force_cpu=True)[0].dtype == torch.float32


def test_a_gpu_that_cuda_cannot_use_is_reported_not_skipped(monkeypatch):
    from metalora.modeling import models

    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "gpu_present", lambda: True)
    monkeypatch.setattr(models.torch.version, "cuda", "12.4")
    with pytest.raises(ModelLoadError, match="torch cannot use it.*train.cpu=true"):
        models.pick_device()
    assert models.pick_device(force_cpu=True).type == "cpu"
    monkeypatch.setattr(models.torch.version, "cuda", None)  # a CPU build of torch: the CPU is expected
    assert models.pick_device().type == "cpu"
