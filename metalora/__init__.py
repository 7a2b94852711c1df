"""metalora: meta-learning LoRA initialisations (MeTA-LoRA) and the baselines it is compared with.

The packages follow the architecture, each importing only those above it in this list:
`speed` (how the method is computed), `method` (adapt, meta_gradients, loss), `data` (task suites, splits,
episodes and their batches, collation), `modeling` (model and LoRA loading), `training`, `evaluation`, `reporting`,
`experiments` (whole `metalora eval` runs and sweeps), `jobs` (plans and sweeps as submitit jobs on SLURM, this
machine or this process). What a notebook needs is exported here; the names
are imported on first use, so `import metalora` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_config": "metalora.config",
    "Config": "metalora.config",
    "notebook_config": "metalora.experiments.notebook",
    "launch_command": "metalora.experiments.notebook",
    "enter_project_root": "metalora.experiments.notebook",
    "run_evaluation": "metalora.experiments.compare",
    "load_samples": "metalora.evaluation.samples",
    "export_adapter": "metalora.experiments.export",
    "run_sweep": "metalora.jobs.sweep",
    "submit_plan": "metalora.jobs.submit",
    "aggregate_sweep": "metalora.experiments.sweep",
    "train": "metalora.training.train",
    "build_parts": "metalora.training.parts",
    "training_step": "metalora.training.step",
    "episode_gradients": "metalora.training.step",
    "apply_meta_gradient": "metalora.training.step",
    "latest_checkpoint": "metalora.training.checkpoints",
    "adapt": "metalora.method.adapt",
    "meta_gradients": "metalora.method.meta",
    "adapt_task": "metalora.method.meta",
    "seeded": "metalora.method.meta",
    "EpisodeSampler": "metalora.data.episodes",
    "episode_batches": "metalora.data.episode_batches",
    "Encoder": "metalora.data.collation",
    "build_splits": "metalora.data.splits",
    "load_suite_dir": "metalora.data.tasks",
    "load_model": "metalora.modeling.models",
    "attach_lora": "metalora.modeling.lora",
    "load_adapter": "metalora.modeling.lora",
    "read_metrics": "metalora.reporting.efficiency",
    "training_curves": "metalora.reporting.plots",
    "comparison_training_curves": "metalora.reporting.plots",
    "few_shot_figure": "metalora.reporting.plots",
    "comparison_sentences": "metalora.reporting.report",
    "write_report": "metalora.reporting.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metalora' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
