"""Helpers the notebooks call so that they hold no logic of their own."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from metalora.config import Config, load_config
from metalora.errors import MetaloraError


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
