"""`metalora sweep params/ablations/<name>.yaml`: an ablation grid executed point by point with papermill.

A sweep file names a notebook, the parameter files every point starts from, fixed overrides, and
either a `grid` (every combination of the listed values) or named `cases` (sets of values that go
together, e.g. the reptile switch), or both (their product). Each point runs the notebook into
`outputs/sweeps/<name>/<point>/` with `train.output_dir` and `train.run_name` pointing there, so
its run directory, eval/ tables and executed notebook sit together. The points run as jobs (`metalora/jobs/sweep.py`):
one SLURM job each on a cluster, child processes side by side on this machine (one per GPU with `--devices`), or
one after another in this process. Finished points are skipped on
a re-run unless their resolved config changed (an edited sweep file: the old directory is set aside and the
point runs again); a failing point is recorded with its error in point.json and the sweep goes on, and
`metalora sweep` exits non-zero at the end. At the end
the points' results are aggregated into results.csv, summary.csv, points.csv and figures.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
from omegaconf import OmegaConf

from metalora.config import ConfigError, experiment_yaml, load_config
from metalora.evaluation.stats import summarise
from metalora.io import atomic_write_json, atomic_write_text
from metalora.reporting.plots import SETTING_LABELS, sweep_figure, sweep_heatmap

POINT_FILE = "point.json"


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    name: str
    notebook: str
    config_files: list[str]
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_dir: str = "outputs/sweeps"


@dataclass
class SweepPoint:
    """One point: its directory name and the overrides that define it."""

    name: str
    values: dict[str, Any]

    def overrides(self) -> list[str]:
        """The point's values as `a.b=value` strings (lists in YAML flow form)."""
        return [f"{key}={_flow(value)}" for key, value in self.values.items()]


def _flow(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_flow(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file.

    Args:
        path: the YAML file (its stem is the sweep's name).

    Returns:
        The sweep spec.

    Raises:
        ConfigError: a missing file, an unknown key, no grid and no cases, or a point whose config
            does not load (the error names the point and the key).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # yaml's scanner/parser errors carry the line and column
        raise ConfigError(f"{path}: cannot parse YAML: {' '.join(str(err).split())}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with notebook, config_files and grid or cases")
    known = {"notebook", "config_files", "overrides", "grid", "cases", "output_dir"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    for key in ("notebook", "config_files"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key '{key}'")
    if not raw.get("grid") and not raw.get("cases"):
        raise ConfigError(f"{path}: give a 'grid' (key: [values]) or 'cases' (name: {{key: value}})")
    for key, values in (raw.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid key '{key}' needs a non-empty list of values")
    spec = SweepSpec(name=path.stem, **raw)
    for point in sweep_points(spec):
        if set(point.name) & {"/", "\\"}:
            raise ConfigError(
                f"{path}: point '{point.name}': a point's directory is named by its values, and a value holding a "
                "path separator cannot name one; give such values a name with `cases` instead of `grid` (e.g. "
                "cases: {mine: {data.suites: [path/to/suite]}})"
            )
        try:
            load_config(spec.config_files, [*spec.overrides, *point.overrides()])
        except ConfigError as err:
            raise ConfigError(f"{path}: point '{point.name}': {err}") from err
    return spec


def sweep_points(spec: SweepSpec) -> list[SweepPoint]:
    """Every point of the sweep: the grid's combinations, times the cases when both are given."""
    keys = list(spec.grid)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*spec.grid.values())]
    cases = list(spec.cases.items()) or [("", {})]
    points = []
    for combo in combos:
        for case_name, case_values in cases:
            parts = [f"{k}={_flow(v)}" for k, v in combo.items()] + ([case_name] if case_name else [])
            points.append(SweepPoint(",".join(parts), {**combo, **case_values}))
    return points


def sweep_dir(spec: SweepSpec) -> Path:
    """Where the sweep's points and aggregates go."""
    return Path(spec.output_dir) / spec.name


def point_parameters(spec: SweepSpec, point: SweepPoint) -> dict[str, Any]:
    """The notebook parameters of a point (what `papermill -p/-y` would pass)."""
    root = sweep_dir(spec)
    overrides = [*spec.overrides, *point.overrides(), f"train.output_dir={root}", f"train.run_name={point.name}"]
    return {"config_files": list(spec.config_files), "overrides": overrides}


def point_config(spec: SweepSpec, point: SweepPoint) -> str:
    """The point's resolved experiment as YAML (its cluster settings left out): what decides whether a finished point
    still answers the sweep."""
    parameters = point_parameters(spec, point)
    return experiment_yaml(load_config(parameters["config_files"], parameters["overrides"]))


def is_finished(point_dir: Path, config: str | None = None) -> bool:
    """A point is finished when its record says ok, its few-shot summary exists and, when `config` is given,
    it ran with that resolved config."""
    record = point_dir / POINT_FILE
    if not record.is_file() or not (point_dir / "eval" / "summary.csv").is_file():
        return False
    saved = json.loads(record.read_text())
    return saved.get("status") == "ok" and (config is None or saved.get("config") == config)


def _set_aside(point_dir: Path) -> Path:
    """Move a point directory that ran with another config out of the way (kept, not deleted)."""
    # Numbered, so that a point replaced twice keeps both earlier versions.
    number = 1
    while (stale := point_dir.with_name(f".{point_dir.name}.replaced-{number}")).exists():
        number += 1
    point_dir.rename(stale)
    return stale


def run_point(
    spec: SweepSpec, point: SweepPoint, kernel: str | None = None, stream: TextIO | None = None
) -> dict[str, Any]:
    """Execute the sweep's notebook for one point and record the outcome in point.json; the notebook's output
    streams to `stream` (default: this process's stdout and stderr) while it runs.

    Returns:
        The record: name, values, status ("ok" or "failed") and, on failure, the error.
    """
    import papermill

    point_dir = sweep_dir(spec) / point.name
    point_dir.mkdir(parents=True, exist_ok=True)
    # The GPUs the point's job was given (empty: all of the machine's, or none).
    record: dict[str, Any] = {"name": point.name, "values": point.values, "config": point_config(spec, point),
                              "device": os.environ.get("CUDA_VISIBLE_DEVICES", "")}  # fmt: skip
    try:
        # The point's own output (training progress, printed sentences) streams as it comes, so a half-hour
        # point is not silent; the executed notebook keeps it too.
        papermill.execute_notebook(
            spec.notebook, str(point_dir / "notebook.ipynb"), parameters=point_parameters(spec, point),
            kernel_name=kernel, progress_bar=False, cwd=str(Path.cwd()), stdout_file=stream or sys.stdout,
            stderr_file=stream or sys.stderr,
        )  # fmt: skip
        record["status"] = "ok"
    except Exception as err:  # a failing point is recorded and the sweep goes on
        record["status"] = "failed"
        # papermill reports the notebook's own exception in ename/evalue
        name, value = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
        record["error"] = f"{name}: {value}".strip()[:4000]
        record["traceback"] = traceback.format_exc()[-4000:]
    atomic_write_json(point_dir / POINT_FILE, record)
    return record


def todo_points(spec: SweepSpec) -> list[SweepPoint]:
    """The points still to run: not finished, or finished with another config (their directory is set aside, kept,
    and the point runs again)."""
    from tqdm.auto import tqdm

    root = sweep_dir(spec)
    todo = []
    for point in sweep_points(spec):
        if is_finished(root / point.name, point_config(spec, point)):
            continue
        if (root / point.name).exists():
            stale = _set_aside(root / point.name)
            tqdm.write(f"point {point.name}: its directory ran another config; kept as {stale.name}, running again")
        todo.append(point)
    return todo


def aggregate_sweep(root: str | Path) -> pd.DataFrame:
    """Collect the points' results into results.csv, summary.csv and points.csv, and draw figures.

    The figures show each point's own trained algorithm (its `meta.algorithm`) against the swept
    values: a line per shot count for a 1-D sweep, a heatmap at the largest shot count for 2-D.

    Returns:
        The per-point summary (swept values, method, n_shots, mean and CI).
    """
    root = Path(root)
    spec = load_sweep(root / "sweep.yaml")
    spec.output_dir = str(root.parent)
    keys = list(spec.grid) + (["case"] if spec.cases else [])
    records, frames = [], []
    for point in sweep_points(spec):
        point_dir = root / point.name
        record_path = point_dir / POINT_FILE
        record = json.loads(record_path.read_text()) if record_path.is_file() else {"status": "not run"}
        records.append({"point": point.name, "status": record["status"], "error": record.get("error", "")})
        if record["status"] != "ok":
            continue
        cfg = load_config(spec.config_files, [*spec.overrides, *point.overrides()])
        results = pd.read_csv(point_dir / "eval" / "results.csv")
        results = results[results["method"] == cfg.meta.algorithm].copy()
        results.insert(0, "point", point.name)
        for key in spec.grid:
            results[key] = point.values[key]
        if spec.cases:
            results["case"] = point.name.split(",")[-1]
        frames.append(results)
    atomic_write_text(root / "points.csv", pd.DataFrame(records).to_csv(index=False))
    if not frames:
        return pd.DataFrame()
    results = pd.concat(frames, ignore_index=True)
    atomic_write_text(root / "results.csv", results.to_csv(index=False))
    summary = pd.concat(
        [summarise(group).assign(**dict(zip(keys, values if isinstance(values, tuple) else (values,), strict=True)))
         for values, group in results.groupby(keys, sort=False)],
        ignore_index=True,
    )  # fmt: skip
    summary = summary[keys + [c for c in summary.columns if c not in keys]]
    atomic_write_text(root / "summary.csv", summary.to_csv(index=False))
    # One setting per figure: the training tasks' own test sets when the sweep scored them, else held-out tasks.
    setting = "seen" if "seen" in set(summary["setting"]) else "heldout"
    shown, title = summary[summary["setting"] == setting], f"Sweep {spec.name} ({SETTING_LABELS[setting]})"
    if len(keys) == 1:
        sweep_figure(shown, keys[0], root / "sweep.png", title=title)
    elif len(keys) == 2:
        sweep_heatmap(shown, keys[0], keys[1], root / "sweep_heatmap.png", title=title)
    return summary
