"""The evaluation in the trackers that hold the training curves: TensorBoard, MLflow (a local file store) and wandb
(offline), each read back and held to eval/summary.csv."""

import json
from pathlib import Path

import pandas as pd
import pytest
from smoke import SMOKE

from metalora.config import load_config
from metalora.experiments.compare import run_evaluation
from metalora.reporting.trackers import evaluation_scalars
from metalora.training.tracker_runs import TRACKER_RECORD

FAST = ["data.heldout_tasks=[add_9,caesar_7]", "eval.n_shots=[0,2]", "eval.seeds=1", "eval.max_test=4",
        "eval.adapt_steps=2", "data.n_test=4", "train.steps=2", "eval.methods=[base,lora,metalora,constant]"]


@pytest.mark.slow
def test_the_evaluation_lands_in_each_trackers_training_run_and_equals_the_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a file store
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(SMOKE, [f"train.output_dir={tmp_path}", "train.log_with=[tensorboard,mlflow,wandb]", *FAST])
    out = run_evaluation(cfg, train_missing=True)  # trains metalora (with the trackers) in a child, then evaluates
    summary = pd.read_csv(out / "summary.csv")
    expected = evaluation_scalars(summary)
    assert len(expected) == 3 * len(summary)  # mean, ci_low, ci_high of every point of the summary
    recorded = json.loads((cfg.run_dir / TRACKER_RECORD).read_text())

    # TensorBoard: the training's log directory holds the curves and, now, the evaluation.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(recorded["tensorboard"]["logging_dir"], size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    logged = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    assert {tag: pytest.approx(value) for tag, value in expected.items()} == {t: logged[t] for t in expected}
    assert any(tag.startswith("stage2/") for tag in logged), "not the run that holds the training curves"
    assert {"eval/few_shot", "eval/per_task"} <= set(events.Tags()["images"])

    # MLflow: the same run id as training, its metrics and the tables and figures as artifacts.
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(recorded["mlflow"]["run_id"])
    assert {tag: pytest.approx(value) for tag, value in expected.items()} == {t: run.data.metrics[t] for t in expected}
    assert any(name.startswith("stage2/") for name in run.data.metrics)
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/summary.csv", "eval/significance.csv", "eval/few_shot.png"} <= artifacts

    # wandb, offline: the evaluation reopened the training's run id; the values in its run file.
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{recorded['wandb']['id']}"))
    assert len(runs) == 2, "training and evaluation did not log to one wandb run id"
    training, evaluation = (wandb_history(next(run.glob("*.wandb"))) for run in runs)
    assert {tag: pytest.approx(value) for tag, value in expected.items()} == {t: evaluation[t] for t in expected}
    significance = pd.read_csv(out / "significance.csv")
    assert (evaluation["eval/significance/_type"], evaluation["eval/significance/nrows"]) == ("table-file",
                                                                                              len(significance))
    assert evaluation["eval/few_shot/count"] == 1
    assert any(tag.startswith("stage2/") for tag in training)


def wandb_history(path: Path) -> dict[str, object]:
    """The last logged value of each key in a wandb run file (a nested value's parts under key/part): protobuf
    records in LevelDB's log format (blocks of 32 KiB; each piece a 7-byte header: checksum, little-endian length,
    kind) after wandb's own 7-byte header."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, position, block, pending, values = path.read_bytes(), 7, 32768, b"", {}
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = Record.FromString(pending)
            pending = b""
            if record.HasField("history"):
                values |= {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.history.item}  # fmt: skip
    return values
