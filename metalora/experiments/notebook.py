"""Helpers the notebooks call so that they hold no logic of their own."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from metalora.config import Config, load_config
from metalora.data.episodes import Episode
from metalora.data.tasks import Task
from metalora.errors import MetaloraError
from metalora.method.batch import EpisodeBatches
from metalora.method.loss import count_input_tokens, count_target_tokens
from metalora.modeling.lora import LORA_MARKER
from metalora.reporting.report import comparison_sentences


def project_root(start: str | Path | None = None) -> Path:
    """The nearest directory at or above `start` (default: the working directory) with params/base.yaml.

    Raises:
        MetaloraError: none is found.
    """
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "params" / "base.yaml").is_file():
            return candidate
    raise MetaloraError(f"no project root (a directory with params/base.yaml) at or above {here}")


def enter_project_root() -> Path:
    """Change the working directory to the project root (see `project_root`) and return it.

    Jupyter starts kernels in notebooks/, papermill in the caller's directory; from the root,
    `params/...` and `outputs/...` mean the same in both.
    """
    root = project_root()
    os.chdir(root)
    return root


def notebook_config(config_files: list[str], overrides: list[str], groups: dict[str, dict[str, Any]]) -> Config:
    """Resolve a notebook's parameters into a config, working from the project root.

    Args:
        config_files: YAML layers, merged in order.
        overrides: `a.b=value` strings, applied last.
        groups: group name -> values (what `papermill -f params/x.yaml` injects), merged after the files.

    Returns:
        The resolved config.
    """
    enter_project_root()
    values = {f"{group}.{key}": value for group, items in groups.items() for key, value in (items or {}).items()}
    return load_config(config_files, overrides, values=values)


def launch_command(config_files: list[str], overrides: list[str], accelerate_config: str) -> str:
    """The shell command that runs the same training under `accelerate launch` (e.g. on several GPUs).

    Args:
        overrides: `a.b=value` strings.
        accelerate_config: an accelerate config file (params/accelerate/*.yaml).

    Returns:
        The command line.
    """
    words = ["accelerate", "launch", "--config_file", accelerate_config, "-m", "metalora.training.train"]
    return shlex.join([*words, *config_files, *overrides])


def episode_table(episodes: list[Episode], tasks: dict[str, Task]) -> pd.DataFrame:
    """One row per episode of a meta-batch: its slot, task, support and query sizes, and its first support example."""
    return pd.DataFrame(
        [{"slot": e.slot, "task": e.task, "instruction": tasks[e.task].instruction, "support": len(e.support),
          "query": len(e.query), "first support input": e.support[0].input, "its target": e.support[0].target}
         for e in episodes]  # fmt: skip
    )


def batch_table(episode: EpisodeBatches) -> pd.DataFrame:
    """One row per batch of one task as the method receives it: support steps (with their micro-batches) in inner-step
    order, then the query batches, with rows, width (positions per row) and real and target tokens."""
    parts = [(f"support step {i}", micro, b) for i, step in enumerate(episode.support) for micro, b in enumerate(step)]
    parts += [(f"query {j}", 0, b) for j, b in enumerate(episode.query)]
    return pd.DataFrame(
        [{"batch": name, "micro-batch": micro, "rows": b["input_ids"].shape[0], "width": b["input_ids"].shape[1],
          "real tokens": count_input_tokens(b), "target tokens": count_target_tokens(b)} for name, micro, b in parts]
    )  # fmt: skip


def _module_of(name: str) -> tuple[str, str, str]:
    """(layer, projection, factor) of a LoRA weight name, e.g. `...layers.3.self_attn.q_proj.lora_A.default.weight`."""
    parts = name.split(".")
    marker = next(i for i, p in enumerate(parts) if p.startswith(LORA_MARKER))
    layer = next((parts[i + 1] for i in range(marker) if parts[i] == "layers"), "?")
    return layer, parts[marker - 1], parts[marker].removeprefix(LORA_MARKER)


def norms_by_module(tensors: dict[str, torch.Tensor]) -> pd.DataFrame:
    """The L2 norm of each LoRA weight's tensor (a gradient, a change) by layer, projection and factor (A or B)."""
    rows = [dict(zip(("layer", "projection", "factor"), _module_of(name), strict=True), norm=float(t.norm()))
            for name, t in tensors.items()]  # fmt: skip
    return pd.DataFrame(rows)


def show_comparison(eval_dir: Path, figures: tuple[str, ...] = ("few_shot.png",),
                    tables: tuple[str, ...] = ("summary.csv", "significance.csv")) -> None:  # fmt: skip
    """Print an evaluation's comparison sentences, then display its figures and tables (the notebooks' shared view)."""
    from IPython.display import Image, display

    for sentence in comparison_sentences(eval_dir):
        print(sentence)
    for figure in figures:
        display(Image(str(eval_dir / figure)))
    for table in tables:
        display(pd.read_csv(eval_dir / table))
