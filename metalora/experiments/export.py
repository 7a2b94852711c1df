"""`metalora export`: a trained LoRA initialisation as a folder others load with plain peft, with a model card in the
Hub's format, and optionally pushed to the Hub.

The folder holds `adapter_config.json` and `adapter_model.safetensors` (what `PeftModel.from_pretrained` reads) and
`README.md`: YAML front matter (`base_model`, `library_name: peft`, tags, datasets) for the Hub, then how the adapter
was trained (algorithm, steps, tasks, the config) and, when the run was evaluated, its few-shot table with
intervals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from metalora.errors import MetaloraError
from metalora.experiments.integrity import recorded_splits
from metalora.io import atomic_directory
from metalora.modeling.models import EMBEDDED_HUB_ID

PAPER = "arXiv:2510.11598"


class ExportError(MetaloraError):
    """A run that cannot be exported as it is asked."""


def read_run(run_dir: Path) -> tuple[dict, dict, Path]:
    """The run's resolved config (as a mapping), its summary.json and its final adapter directory.

    Raises:
        ExportError: not a finished run, or its final weights are not a LoRA adapter (fomaml trains the whole model).
    """
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    if not summary_path.is_file() or not config_path.is_file():
        raise ExportError(f"{run_dir}: not a finished run (needs summary.json and config.yaml; train it to the end)")
    summary = json.loads(summary_path.read_text())
    adapter = run_dir / summary["final_weights"]
    if not (adapter / CONFIG_NAME).is_file():
        raise ExportError(f"{run_dir}: its final weights ({summary['final_weights']}) are not a LoRA adapter (a "
                          f"{summary.get('algorithm')} run trains every base weight); only LoRA runs export")
    return yaml.safe_load(config_path.read_text()), summary, adapter


def hub_base_model(config: dict) -> str:
    """The base model's Hub id as the card and adapter_config.json name it (the embedded model's original)."""
    name = config["model"]["name"]
    return EMBEDDED_HUB_ID if name == "embedded" else name


def training_sources(config: dict, trained: list[str]) -> dict[str, str]:
    """Where the tasks `trained` come from and under which licence, as their suites' manifests record it
    (`source`, `license`); a suite without a manifest (the embedded one, one read from the Hub) by its name."""
    sources: dict[str, str] = {}
    for suite in config["data"]["suites"]:
        manifest = Path(str(suite)) / "tasks.json"
        if not manifest.is_file():
            sources[str(suite)] = "see the suite"
            continue
        entries = json.loads(manifest.read_text()).get("tasks", {})
        for task in (entries[t] for t in trained if t in entries):
            sources[task.get("source", str(suite))] = task.get("license", "not recorded")
    return dict(sorted(sources.items()))


def evaluation_table(eval_dir: Path) -> str:
    """The evaluation's mean and 95 % interval per setting, method and shots, as a Markdown table ('' when none)."""
    path = eval_dir / "summary.csv"
    if not path.is_file():
        return ""
    summary = pd.read_csv(path)
    summary["score (95 % CI)"] = [f"{m:.3f} ({lo:.3f}-{hi:.3f})" for m, lo, hi in
                                  zip(summary["mean"], summary["ci_low"], summary["ci_high"], strict=True)]  # fmt: skip
    return summary[["setting", "method", "n_shots", "score (95 % CI)", "n_tasks"]].to_markdown(index=False)


def model_card(config: dict, summary: dict, run_dir: Path) -> ModelCard:
    """The card: Hub metadata, then how the adapter was trained, its evaluation and the citation."""
    algorithm = summary["algorithm"]
    trained = sorted(recorded_splits(algorithm, run_dir)["train"])
    sources = training_sources(config, trained)
    data = ModelCardData(base_model=hub_base_model(config), library_name="peft", license=None,
                         tags=["metalora", "lora", "peft", "meta-learning", algorithm],
                         datasets=list(sources))  # fmt: skip
    data_lines = "\n".join(f"- {source} (licence: {licence})" for source, licence in sources.items())
    lora, meta = config["lora"], config["meta"]
    order = " (first order)" if meta.get("first_order") and algorithm == "metalora" else ""
    inner = f"{meta['inner_steps']} steps of {meta['inner_optimizer']} at {meta['inner_lr']}"
    table = evaluation_table(run_dir / "eval")
    evaluated = table or "This run was not evaluated with `metalora eval` before it was exported."
    embedded = ""
    if config["model"]["name"] == "embedded":
        embedded = (" It was trained on the kit's embedded model, the GGUF (Q4_1) file of this model dequantized: "
                    "weights close to the Hub's, not the same.")  # fmt: skip
    text = f"""---
{data.to_yaml()}
---

# {run_dir.name}: a {algorithm} LoRA initialisation of {data.base_model}

A LoRA initialisation trained with the metalora kit ({algorithm}), meant to be adapted to a new task from a few
examples.{embedded}

## Training

- algorithm: {algorithm}{order}; {summary['steps']} meta-steps
- LoRA: rank {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']}, modules {lora['target_modules']}
- inner loop: {inner}; meta-batch {meta['meta_batch_size']}
- trainable parameters: {summary['trainable_parameters']:,}
- training tasks ({len(trained)}): {', '.join(trained)}

Training data, as the task suites record it (the adapter carries what it learned from it; check the licences before
using it):

{data_lines}

## Evaluation

Few-shot score on the evaluated tasks (mean over tasks, 95 % interval):

{evaluated}

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{data.base_model}")
model = PeftModel.from_pretrained(base, "<this folder or repo>", is_trainable=True)  # then adapt on your examples
```

## Config

```yaml
{yaml.safe_dump(config, sort_keys=False).strip()}
```

## Citation

The method: MeTA-LoRA, {PAPER} (https://arxiv.org/abs/2510.11598).
"""
    return ModelCard(text)


def export_adapter(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's final adapter and its model card into `out` (replaced whole, atomically).

    Raises:
        ExportError: see `read_run`.
    """
    run_dir = Path(run_dir)
    config, summary, adapter = read_run(run_dir)
    with atomic_directory(Path(out)) as tmp:
        adapter_config = json.loads((adapter / CONFIG_NAME).read_text())
        # The local path the kit loaded the base from means nothing elsewhere: name the model on the Hub.
        adapter_config["base_model_name_or_path"] = hub_base_model(config)
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
        shutil.copyfile(adapter / SAFETENSORS_WEIGHTS_NAME, tmp / SAFETENSORS_WEIGHTS_NAME)
        model_card(config, summary, run_dir).save(tmp / "README.md")
    return Path(out)


def push_folder(folder: str | Path, repo_id: str, private: bool = True) -> str:
    """Upload an exported folder to the Hub model repository `repo_id` (created when missing); returns its URL.
    Needs a token (`hf auth login` or HF_TOKEN)."""
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="Upload a metalora adapter")  # fmt: skip
    return f"https://huggingface.co/{repo_id}"
