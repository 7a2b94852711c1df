"""Which experiment-tracker runs a training logged to, so that its resumption and its evaluation log to them again.

`trackers.json` in the run directory holds, per tracker of `train.log_with`, what reopens its run: TensorBoard's log
directory (reopened by the run name), MLflow's and wandb's run ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

from metalora.io import atomic_write_json

TRACKER_RECORD = "trackers.json"


def tracker_identity(tracker: GeneralTracker) -> dict[str, str]:
    """What reopens a started tracker's run later: its log directory (TensorBoard) or its run id (MLflow, wandb)."""
    if tracker.name == "mlflow":
        return {"run_id": tracker.active_run.info.run_id}
    if tracker.name == "wandb":
        return {"id": tracker.run.id}
    if tracker.name == "tensorboard":
        return {"logging_dir": str(tracker.logging_dir)}
    return {}


def record_trackers(run_dir: Path, trackers: list[GeneralTracker]) -> None:
    """Write which tracker runs a training logged to (`TRACKER_RECORD`), so its evaluation, or its resumption, logs
    to the same ones."""
    atomic_write_json(Path(run_dir) / TRACKER_RECORD, {t.name: tracker_identity(t) for t in trackers})


def reopen_kwargs(run_dir: Path) -> dict[str, dict[str, Any]]:
    """accelerate `init_kwargs` that reopen the tracker runs `run_dir` recorded (empty when it recorded none)."""
    path = Path(run_dir) / TRACKER_RECORD
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    kwargs: dict[str, dict[str, Any]] = {}
    if "run_id" in recorded.get("mlflow", {}):
        kwargs["mlflow"] = {"run_id": recorded["mlflow"]["run_id"]}
    if "id" in recorded.get("wandb", {}):
        kwargs["wandb"] = {"id": recorded["wandb"]["id"], "resume": "allow"}
    return kwargs
