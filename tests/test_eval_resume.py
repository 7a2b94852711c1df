"""An evaluation built for hours: each scored point is journaled at once, and a killed `metalora eval` resumes where
it stopped with final tables equal to an uninterrupted run's."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from smoke import SMOKE

from metalora.config import load_config
from metalora.evaluation import fewshot
from metalora.evaluation.samples import POINT_COLUMNS, load_samples
from metalora.evaluation.scoring import score_task
from metalora.experiments.compare import run_evaluation
from metalora.experiments.journal import JOURNAL

FAST = ["data.heldout_tasks=[add_9,caesar_7]", "eval.n_shots=[0,2]", "eval.seeds=2", "eval.max_test=4",
        "eval.adapt_steps=2", "data.n_test=4", "train.steps=2", "eval.methods=[base,lora,metalora]"]  # fmt: skip
# The adaptation time is a measurement of the run, not a result: it differs between any two runs.
TIMING = ["adapt_seconds"]


def results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv").drop(columns=TIMING)


def points_written(run_dir: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (run_dir / JOURNAL).glob("points-*.jsonl"))


def kill_after(overrides: list[str], run_dir: Path, points: int) -> None:
    """Start `metalora eval` in a child and SIGKILL it once `points` points are in its journal."""
    command = [sys.executable, "-m", "metalora.cli", "eval", *SMOKE, *overrides]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    deadline = time.monotonic() + 300
    while child.poll() is None and time.monotonic() < deadline:
        if (run_dir / JOURNAL).is_dir() and points_written(run_dir) >= points:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert child.wait() == -signal.SIGKILL, "the evaluation ended before it could be killed"


@pytest.mark.slow
def test_a_killed_evaluation_resumes_to_the_tables_of_an_uninterrupted_one(tmp_path, monkeypatch):
    overrides = [f"train.output_dir={tmp_path}", *FAST]
    cfg = load_config(SMOKE, overrides)
    whole = results(run_evaluation(cfg, train_missing=True))  # trains the runs, then one uninterrupted evaluation
    whole_samples = load_samples(cfg.run_dir)
    planned = len(whole) - 2  # lora's 0-shot rows are copies of base's, not scored points
    assert not (cfg.run_dir / JOURNAL).exists(), "a finished evaluation leaves no journal"
    stamp = (cfg.run_dir / "eval" / "results.csv").stat().st_mtime_ns
    for point in sorted(random.Random(7).sample(range(1, planned), 2)):
        kill_after(overrides, cfg.run_dir, point)
        assert (cfg.run_dir / "eval" / "results.csv").stat().st_mtime_ns == stamp, "a killed run touched eval/"
        assert points_written(cfg.run_dir) >= point
    # A line torn by the kill at its last write: cut off, and that point scored again. A line damaged so that it
    # still parses (a score of 7.5): set aside, and that point scored again too.
    points = next((cfg.run_dir / JOURNAL).glob("points-*.jsonl"))
    first, *rest = points.read_text().splitlines()
    points.write_text("\n".join([json.dumps({**json.loads(first), "value": 7.5}), *rest]) + "\n")
    with points.open("a") as handle:
        handle.write('{"method": "lora", "task": "add')
    kept = points_written(cfg.run_dir) - 2
    scored = []
    monkeypatch.setattr(fewshot, "score_task", lambda *args: scored.append(args[3].name) or score_task(*args))
    resumed = results(run_evaluation(cfg))
    assert len(scored) == planned - kept, "the resumed evaluation scored points its journal already held"
    pd.testing.assert_frame_equal(resumed, whole)
    # The answers behind the points, kept with them through the kill: each scored item once, as uninterrupted.
    samples = load_samples(cfg.run_dir)
    item = [*POINT_COLUMNS, "item"]
    assert not samples.duplicated(item).any() and len(samples) == len(whole_samples) == planned * 4
    pd.testing.assert_frame_equal(samples.sort_values(item, ignore_index=True),
                                  whole_samples.sort_values(item, ignore_index=True))  # fmt: skip
    assert not (cfg.run_dir / JOURNAL).exists()


@pytest.mark.slow
def test_points_of_another_evaluation_are_set_aside_not_reused(tmp_path):
    overrides = [f"train.output_dir={tmp_path}", *FAST]
    cfg = load_config(SMOKE, overrides)
    run_evaluation(cfg, train_missing=True)
    journal = cfg.run_dir / JOURNAL
    journal.mkdir()
    (journal / "fingerprint.json").write_text(json.dumps({"fingerprint": "another evaluation"}))
    row = {"method": "base", "task": "add_9", "n_shots": 0, "seed": 0, "metric": "exact_match", "value": 7.0,
           "n_test": 4, "adapt_seconds": 0.0, "test_loss": 1.0, "setting": "heldout", "train_seed": -1}  # fmt: skip
    (journal / "points-0.jsonl").write_text(json.dumps(row) + "\n")
    out = run_evaluation(cfg)
    assert 7.0 not in set(pd.read_csv(out / "results.csv")["value"])
    kept = list(tmp_path.glob(f"**/{JOURNAL}.other-*"))
    assert len(kept) == 1 and (kept[0] / "points-0.jsonl").read_text() == json.dumps(row) + "\n"
