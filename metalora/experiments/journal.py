"""Evaluation points written the moment they are scored, so that a killed `metalora eval` resumes where it stopped.

`<run_dir>/eval.points/` sits beside `eval/` (which is replaced whole at the end): `fingerprint.json` says which
evaluation the points belong to (the resolved experiment and the trained weights it reads), and each process, or
each evaluation job of `metalora submit`, appends its points to `points-<index>.jsonl`, one line per point, flushed
to disk before the next point starts; a point's per-item answers go to `samples-<index>.jsonl` (one line per point)
just before it, so a point on record always has its answers. A line torn by a kill is cut off on the next start.
Points of another evaluation (a changed config, retrained weights) are set aside under a new name, never deleted,
and the evaluation starts over. Once the final tables are written the journal is removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from metalora.evaluation.fewshot import EvalRow, PointKey, point_key
from metalora.evaluation.samples import POINT_COLUMNS, ItemAnswer, answer_rows
from metalora.io import atomic_write_json
from metalora.training.budgets import FULL_DATA_SHOTS

LOGGER = logging.getLogger("metalora")
JOURNAL = "eval.points"


def fingerprint(config_text: str, checksum_records: list[Path]) -> str:
    """A digest of the resolved evaluation config and the checksum records of the trained weights it evaluates.

    The records hold each weight file's SHA-256 and were verified against the files before the evaluation, so
    hashing them identifies the weights without reading the weights a second time.
    """
    digest = hashlib.sha256(config_text.encode())
    for path in sorted(checksum_records):
        digest.update(str(path).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _plausible(row: EvalRow) -> bool:
    """A row a scorer could have written: a score in [0, 1] (NaN where adaptation diverged), tested items, shots."""
    if not isinstance(row.value, int | float) or not isinstance(row.n_test, int) or not isinstance(row.n_shots, int):
        return False
    score_ok = 0.0 <= row.value <= 1.0 if row.finite else math.isnan(row.value)
    return score_ok and row.n_test > 0 and row.n_shots >= FULL_DATA_SHOTS


def _read_points(path: Path) -> list[EvalRow]:
    names = {f.name for f in fields(EvalRow)}
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = EvalRow(**{k: v for k, v in json.loads(line).items() if k in names})
        except (json.JSONDecodeError, TypeError):
            LOGGER.warning("%s: skipped a line torn by an interrupted write: %.60s", path, line)
            continue
        if _plausible(row):
            rows.append(row)
        else:  # damaged but parseable: scored again rather than carried into the tables and figures
            LOGGER.warning("%s: skipped a damaged point (it will be scored again): %.80s", path, line)
    return rows


def journaled_points(run_dir: Path) -> set[PointKey]:
    """The points the journal of `run_dir` holds, whichever evaluation scored them (for progress, not for tables)."""
    return {point_key(row) for path in sorted((Path(run_dir) / JOURNAL).glob("points-*.jsonl"))
            for row in _read_points(path)}  # fmt: skip


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write cut short), so that the next point starts on its own line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


class PointJournal:
    """The finished points of one evaluation, and the progress bar over all of this process's points.

    Args:
        run_dir: the run directory that receives `eval/`.
        digest: `fingerprint` of this evaluation.
        rank: this process's or job's index (its own points file).
        planned: how many points this process scores in all (the progress bar's total).
        show: draw the progress bar (the main process).
    """

    def __init__(self, run_dir: Path, digest: str, rank: int, planned: int, show: bool):
        self.directory = Path(run_dir) / JOURNAL
        # Evaluation jobs of one plan start together: one at a time judges (and sets aside) what the journal holds.
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with (Path(run_dir) / f".{JOURNAL}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._set_aside_other_evaluations(digest)
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.directory / "fingerprint.json", {"fingerprint": digest})
        files = sorted(self.directory.glob("points-*.jsonl"))
        self.finished = {point_key(row): row for path in files for row in _read_points(path)}
        path, samples = self.directory / f"points-{rank}.jsonl", self.directory / f"samples-{rank}.jsonl"
        _cut_torn_tail(path)
        _cut_torn_tail(samples)
        self._file: TextIO = path.open("a")
        self._samples: TextIO = samples.open("a")
        # Off a terminal (papermill's log, CI) a line every 30 s instead of a redraw every 0.1 s.
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=planned, desc="evaluation points", unit="point", disable=not show, dynamic_ncols=True,
                        mininterval=0.1 if interactive else 30.0, file=sys.stderr)  # fmt: skip

    def _set_aside_other_evaluations(self, digest: str) -> None:
        record = self.directory / "fingerprint.json"
        if not self.directory.is_dir():
            return
        try:
            same = json.loads(record.read_text())["fingerprint"] == digest
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            same = False
        if not same:
            aside = self.directory.with_name(f"{JOURNAL}.other-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(self.directory, aside)
            LOGGER.warning("%s held points of another evaluation (config or weights changed); kept as %s, starting "
                           "over", self.directory, aside.name)  # fmt: skip

    def done(self, key: PointKey) -> EvalRow | None:
        """The row of a point scored before this start, or None; counted on the progress bar when found."""
        row = self.finished.get(key)
        if row is not None:
            self.bar.update(1)
        return row

    def record(self, row: EvalRow, answers: list[ItemAnswer]) -> None:
        """Append a newly scored point, its answers first, and force both to disk before the next point starts."""
        if answers:
            line = {"point": list(point_key(row)), "answers": [asdict(answer) for answer in answers]}
            self._samples.write(json.dumps(line, allow_nan=True) + "\n")
            self._samples.flush()
            os.fsync(self._samples.fileno())
        self._file.write(json.dumps(asdict(row), allow_nan=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.bar.update(1)
        self.bar.set_postfix_str(f"{row.method} {row.task} {row.n_shots} shots", refresh=False)

    def close(self) -> None:
        """Close the points file and the progress bar (the points stay for a later resume)."""
        self.bar.close()
        self._file.close()
        self._samples.close()

    def answers(self, keys: list[PointKey]) -> list[dict[str, object]]:
        """The per-item answers the journal holds for `keys`, as flat rows (`samples.answer_rows`), in their order.
        A point scored twice (killed between its answers and its row) keeps its last answers."""
        held: dict[PointKey, list[ItemAnswer]] = {}
        for path in sorted(self.directory.glob("samples-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    held[tuple(record["point"])] = [ItemAnswer(**answer) for answer in record["answers"]]
                except (json.JSONDecodeError, KeyError, TypeError):
                    LOGGER.warning("%s: skipped a damaged line of answers: %.60s", path, line)
        return [row for key in keys if key in held
                for row in answer_rows(dict(zip(POINT_COLUMNS, key, strict=True)), held[key])]  # fmt: skip

    def remove(self) -> None:
        """Delete the journal: the evaluation's tables now hold every point."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
