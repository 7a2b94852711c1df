"""Tasks and task suites in the canonical on-disk format, validated with file/line/field errors.

A suite directory holds `tasks.json` ({"tasks": {name: {"instruction", "metric", "options"?...}}})
and one `<name>.jsonl` per task ({"input", "target", "group"?, ...} per line). `group` marks examples that
are the same item in different tasks (translations in a multilingual suite); every split keeps a group
on one side.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from metalora.errors import MetaloraError
from metalora.io import atomic_write_json, atomic_write_text

METRICS = ("exact_match", "accuracy")


class TaskError(MetaloraError):
    """A task suite or task selection is invalid; the message names the file, line, field or task."""


@dataclass(frozen=True)
class Example:
    """One example; `id` is unique within its suite (`<task>:<line>`); `group` is shared by its translations."""

    id: str
    input: str
    target: str
    group: str | None = None


@dataclass
class Task:
    """A named task: its instruction, metric, optional label set and examples."""

    name: str
    instruction: str
    metric: str
    examples: list[Example]
    options: list[str] | None = None
    family: str = ""


@dataclass
class TaskSuite:
    """Tasks by name, plus the suite's own suggested split (empty when it has none)."""

    tasks: dict[str, Task]
    default_train: list[str] = field(default_factory=list)
    default_heldout: list[str] = field(default_factory=list)


def _read_manifest(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise TaskError(f"{path}: task manifest not found")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise TaskError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}: line {err.lineno}: malformed JSON: {err.msg}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tasks"), dict):
        raise TaskError(f"{path}: expected an object with a 'tasks' mapping")
    for name, meta in manifest["tasks"].items():
        if not name or name.startswith(".") or set(name) & {"/", "\\", "\0"}:
            raise TaskError(f"{path}: task '{name}': a task name must be a plain file name (no path, no leading dot)")
        if not isinstance(meta, dict):
            raise TaskError(f"{path}: task '{name}': expected an object")
        if not isinstance(meta.get("instruction", ""), str):
            raise TaskError(f"{path}: task '{name}': field 'instruction' must be a string")
        if meta.get("metric", "exact_match") not in METRICS:
            raise TaskError(f"{path}: task '{name}': field 'metric' must be one of {METRICS}")
        options = meta.get("options")
        if options is not None and (not isinstance(options, list) or not all(isinstance(o, str) for o in options)):
            raise TaskError(f"{path}: task '{name}': field 'options' must be a list of strings")
        if meta.get("metric") == "accuracy" and not options:
            raise TaskError(
                f"{path}: task '{name}': metric 'accuracy' needs 'options' (the label set it ranks); "
                "without them use 'exact_match'"
            )
    return manifest["tasks"]


def _read_examples(path: Path, task: str, options: list[str] | None) -> list[Example]:
    if not path.is_file():
        raise TaskError(f"{path}: example file of task '{task}' not found")
    examples = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TaskError(f"{path}: line {line_no}: not UTF-8 ({err.reason} at byte {err.start})") from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}: line {line_no}: malformed JSON: {err.msg}") from err
            if not isinstance(row, dict):
                raise TaskError(f"{path}: line {line_no}: expected a JSON object")
            for key in ("input", "target"):
                if not isinstance(row.get(key), str):
                    raise TaskError(f"{path}: line {line_no}: field '{key}' is missing or not a string")
            group = row.get("group")
            if group is not None and not isinstance(group, str):
                raise TaskError(f"{path}: line {line_no}: field 'group' must be a string, got {type(group).__name__}")
            if options is not None and row["target"] not in options:
                raise TaskError(
                    f"{path}: line {line_no}: field 'target' {row['target']!r} is not one of the task's options"
                )
            examples.append(Example(id=f"{task}:{line_no}", input=row["input"], target=row["target"], group=group))
    if not examples:
        raise TaskError(f"{path}: task '{task}' has no examples")
    return examples


def load_suite_dir(directory: str | Path) -> TaskSuite:
    """Load and validate a task-suite directory.

    Args:
        directory: a directory with `tasks.json` and one `<task>.jsonl` per task.

    Returns:
        The suite (no default split).

    Raises:
        TaskError: missing files, malformed JSON, missing fields, empty tasks or targets outside `options`.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory / "tasks.json")
    tasks = {}
    for name, meta in manifest.items():
        options = meta.get("options")
        tasks[name] = Task(
            name=name,
            instruction=meta.get("instruction", ""),
            metric=meta.get("metric", "accuracy" if options else "exact_match"),
            options=options,
            examples=_read_examples(directory / f"{name}.jsonl", name, options),
            family=meta.get("family", ""),
        )
    return TaskSuite(tasks=tasks)


def write_suite_dir(tasks: list[Task], directory: str | Path) -> Path:
    """Write tasks in the canonical format (each file atomically).

    Args:
        directory: destination directory (created).

    Returns:
        The directory.
    """
    directory = Path(directory)
    manifest: dict[str, dict] = {}
    for task in tasks:
        meta: dict[str, object] = {"instruction": task.instruction, "metric": task.metric}
        if task.options is not None:
            meta["options"] = task.options
        if task.family:
            meta["family"] = task.family
        manifest[task.name] = meta
        lines = (json.dumps(_example_record(e), ensure_ascii=False) for e in task.examples)
        atomic_write_text(directory / f"{task.name}.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(directory / "tasks.json", {"tasks": manifest})
    return directory


def _example_record(example: Example) -> dict[str, str]:
    record = {"input": example.input, "target": example.target}
    if example.group is not None:
        record["group"] = example.group
    return record


def merge_suites(suites: list[tuple[str, TaskSuite]]) -> TaskSuite:
    """Merge suites into one; a task name found in two suites is an error naming both.

    Args:
        suites: (source label, suite) pairs.

    Returns:
        The merged suite (default splits concatenated).
    """
    merged = TaskSuite(tasks={})
    origin: dict[str, str] = {}
    for label, suite in suites:
        for name, task in suite.tasks.items():
            if name in merged.tasks:
                raise TaskError(f"duplicate task name '{name}' in {origin[name]} and {label}")
            merged.tasks[name] = task
            origin[name] = label
        merged.default_train += suite.default_train
        merged.default_heldout += suite.default_heldout
    return merged


def match_tasks(names: list[str], patterns: list[str], key: str) -> list[str]:
    """Return the names matching any glob pattern, in the order of `names`.

    Args:
        patterns: glob patterns (`lama_*`) or exact names.
        key: the config key the patterns come from (for the error message).

    Raises:
        TaskError: a pattern matches no task.
    """
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise TaskError(f"{key}: '{pattern}' matches no task in the suite")
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def select_tasks(
    suite: TaskSuite, train: list[str], heldout: list[str], exclude: list[str]
) -> tuple[list[str], list[str]]:
    """Choose meta-training and held-out task names.

    Args:
        suite: the merged suite.
        train: glob patterns of meta-training tasks; empty means the suite's default split, else all
            tasks. Held-out tasks are always removed from it.
        heldout: glob patterns of held-out tasks; empty means the suite's default split.
        exclude: glob patterns removed from both.

    Returns:
        (train names, held-out names), disjoint.

    Raises:
        TaskError: a pattern matches nothing.
    """
    names = list(suite.tasks)
    excluded = set(match_tasks(names, exclude, "data.exclude_tasks"))
    held = match_tasks(names, heldout, "data.heldout_tasks") if heldout else list(suite.default_heldout)
    if train:
        chosen = match_tasks(names, train, "data.train_tasks")
    elif suite.default_train:
        chosen = list(suite.default_train)
    else:
        chosen = names
    # A held-out task is never meta-trained on, even when a train pattern matches it: no leak.
    held_set = set(held)
    return [n for n in chosen if n not in excluded and n not in held_set], [n for n in held if n not in excluded]
