"""Write a model's architecture (config + tokenizer, no weights) for benchmarks with `model.random_init`.

    python -m metalora.benchmarks.architectures OUT_DIR [params.yaml ...] [a.b=value ...]

Writes OUT_DIR/<preset>/ for each preset below: the configured model's config with the preset's
shape changes, and its tokenizer. A few megabytes instead of the weights, so a GPU machine without
hub access can time the same architecture (`model.name=OUT_DIR/<preset> model.random_init=true`);
speed and memory do not depend on the weights' values.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from metalora.config import load_config, split_args
from metalora.modeling.models import embedded_model_dir

# Shape changes on top of the configured model's config (the embedded model: SmolLM2-135M, a Llama).
PRESETS: dict[str, dict[str, int]] = {
    "base": {},
    # A 1.7B-parameter Llama of the same family's larger shape: wider, fewer layers, full attention heads.
    "llama-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 64,
    },
}


def export_architectures(out_dir: Path, model_name: str) -> list[Path]:
    """Write one config + tokenizer directory per preset.

    Args:
        out_dir: parent directory of the preset directories.
        model_name: a local model directory or hub id whose config and tokenizer are the starting point.

    Returns:
        The directories written.
    """
    written = []
    for preset, changes in PRESETS.items():
        target = out_dir / preset
        config = AutoConfig.from_pretrained(model_name)
        for key, value in changes.items():
            setattr(config, key, value)
        config.save_pretrained(target)
        AutoTokenizer.from_pretrained(model_name).save_pretrained(target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """Export the presets of the configured model (default: the embedded one); returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    files, overrides = split_args(args[1:])
    cfg = load_config(files, overrides)
    name = str(embedded_model_dir(cfg.model)) if cfg.model.name == "embedded" else cfg.model.name
    for path in export_architectures(Path(args[0]), name):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
