"""Turn datasets (hub ids, or local json/parquet files) into a task suite in the canonical format.

    metalora prepare-data gsm8k --dataset openai/gsm8k --config main --split test --out data/gsm8k
    metalora prepare-data generic --dataset json --data-files rows.jsonl --split train \
        --input-field question --target-field answer --group-by topic --out data/mine

Every source goes through `datasets.load_dataset`, so a hub id and a local file take the same path.
"""

from __future__ import annotations

import argparse
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from tqdm.auto import tqdm

from metalora.data.splits import derived_seed
from metalora.data.tasks import Example, Task, write_suite_dir
from metalora.errors import MetaloraError


class PrepareError(MetaloraError):
    """A dataset row or argument does not fit the chosen source kind."""


@dataclass
class Row:
    """One converted example before grouping into tasks."""

    # The task the example joins (not to be confused with `item`).
    group: str
    input: str
    target: str
    instruction: str = ""
    options: list[str] | None = None
    # The example's group in the suite format: the same item in other tasks (e.g. its translations).
    item: str | None = None


@dataclass
class PrepareOptions:
    """What `metalora prepare-data` is asked to do (its command-line options, usable without argparse)."""

    # math, gsm8k, scienceqa, natural-instructions or generic: how rows become examples.
    kind: str
    # A hub id, or a builder name such as json or parquet with `data_files`.
    dataset: str
    # The suite directory written.
    out: str
    config: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    max_samples: int = 600
    min_samples: int = 10
    seed: int = 0
    # generic only: the input and target columns, one task per value of `group_by`, a label-set column, the task
    # instruction, a column naming the item an example is a version of, and the task name when not grouping.
    input_field: str | None = None
    target_field: str | None = None
    group_by: str | None = None
    options_field: str | None = None
    instruction: str = ""
    item_field: str | None = None
    name: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PrepareOptions:
        """The options of a parsed `prepare-data` command line."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` in `text` (braces may nest), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin - 1, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:index].strip()
    return None


def gsm8k_answer(text: str) -> str | None:
    """The final answer after `####`, without thousands separators, or None."""
    if "####" not in text:
        return None
    return text.split("####")[-1].strip().replace(",", "")


def slug(text: str) -> str:
    """A task-name-safe form of a group label."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_") or "task"


def _math(row: dict, _: PrepareOptions) -> Row | None:
    answer = last_boxed(row["solution"])
    if answer is None:
        return None
    return Row(f"math_{slug(row.get('type', 'all'))}", row["problem"], answer, "Solve the problem. Give the answer.")


def _gsm8k(row: dict, _: PrepareOptions) -> Row | None:
    answer = gsm8k_answer(row["answer"])
    if answer is None:
        return None
    return Row("gsm8k", row["question"], answer, "Solve the word problem. Give the final number.")


def _scienceqa(row: dict, _: PrepareOptions) -> Row | None:
    choices = [str(c) for c in row["choices"]]
    listed = " ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
    # The hint is the question's context (a passage, a table as text); many questions cannot be answered without it.
    context = f"Context: {row['hint']} " if str(row.get("hint") or "").strip() else ""
    return Row(
        f"scienceqa_{slug(row.get('subject', 'all'))}",
        f"{context}{row['question']} Options: {listed}",
        choices[int(row["answer"])],
        "Answer the science question with one of the options.",
        choices,
    )


def _natural_instructions(row: dict, _: PrepareOptions) -> Row | None:
    targets = row["targets"]
    target = targets[0] if isinstance(targets, list) else targets
    definition = row["definition"]
    definition = definition[0] if isinstance(definition, list) else definition
    return Row(slug(row["task_name"]), row["inputs"], str(target), definition)


def _generic(row: dict, args: PrepareOptions) -> Row | None:
    group = slug(row[args.group_by]) if args.group_by else slug(args.name or args.dataset)
    options = [str(o) for o in row[args.options_field]] if args.options_field else None
    item = f"{args.item_field}:{row[args.item_field]}" if args.item_field else None
    return Row(group, str(row[args.input_field]), str(row[args.target_field]), args.instruction, options, item)


SOURCES: dict[str, tuple[Callable[[dict, PrepareOptions], Row | None], tuple[str, ...]]] = {
    "math": (_math, ("problem", "solution")),
    "gsm8k": (_gsm8k, ("question", "answer")),
    "scienceqa": (_scienceqa, ("question", "choices", "answer")),
    "natural-instructions": (_natural_instructions, ("task_name", "definition", "inputs", "targets")),
    "generic": (_generic, ()),
}


# Local files read as text: datasets decodes them as UTF-8 only once it iterates the rows, deep inside pyarrow.
TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".txt"}


def check_utf8(path: Path) -> None:
    """Refuse a local text file that is not UTF-8, naming its first undecodable line.

    Raises:
        PrepareError: the file's line and byte that do not decode.
    """
    if path.suffix not in TEXT_SUFFIXES or not path.is_file():
        return
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                where = f"byte {line[err.start]:#04x} at column {err.start + 1}"
                raise PrepareError(f"{path}: line {number} is not UTF-8 ({where}); convert the file, e.g. iconv -f "
                                   "latin1 -t utf-8") from err  # fmt: skip


def convert_rows(kind: str, rows: Iterable[dict], args: PrepareOptions) -> list[Row]:
    """Convert dataset rows with the source kind's rules; rows without an extractable answer are skipped.

    Raises:
        PrepareError: a row lacks a field the source kind needs (named with the row number).
    """
    convert, needed = SOURCES[kind]
    if kind == "generic":
        fields = (args.input_field, args.target_field, args.group_by, args.options_field, args.item_field)
        needed = tuple(f for f in fields if f)
    converted = []
    labels: dict[str, str] = {}
    for number, row in enumerate(tqdm(rows, desc=f"converting {kind}", unit="row")):
        missing = [f for f in needed if f not in row]
        if missing:
            raise PrepareError(f"row {number}: field(s) {missing} missing for source '{kind}' (has {sorted(row)})")
        empty = [f for f in needed if row[f] is None]
        if empty:
            raise PrepareError(f"row {number}: field(s) {empty} are null; a null would be written as the text 'None'")
        result = convert(row, args)
        if result is None:
            continue
        if result.options is not None and result.target not in result.options:
            raise PrepareError(f"row {number}: target {result.target!r} is not among its options {result.options}")
        if kind == "generic" and args.group_by:
            # Two labels that slug to one task name would merge two tasks without a word.
            label = str(row[args.group_by])
            if labels.setdefault(result.group, label) != label:
                raise PrepareError(f"row {number}: --group-by values {labels[result.group]!r} and {label!r} both "
                                   f"become task '{result.group}'; make them distinct")  # fmt: skip
        converted.append(result)
    return converted


def build_tasks(rows: list[Row], max_samples: int, min_samples: int, seed: int) -> list[Task]:
    """Group rows into tasks, shuffle (seeded), cap at `max_samples`, drop tasks under `min_samples`."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        groups[row.group].append(row)
    tasks = []
    for name, members in sorted(groups.items()):
        if len(members) < min_samples:
            continue
        random.Random(derived_seed(seed, "prepare", name)).shuffle(members)
        members = members[:max_samples]
        examples = [Example(f"{name}:{i + 1}", m.input, m.target, m.item) for i, m in enumerate(members)]
        # Options that differ per question (ScienceQA) cannot be a task-level label set; keep them in
        # the input text and score by exact match instead.
        uniform = members[0].options is not None and all(m.options == members[0].options for m in members)
        tasks.append(
            Task(
                name=name,
                instruction=members[0].instruction,
                metric="accuracy" if uniform else "exact_match",
                examples=examples,
                options=members[0].options if uniform else None,
            )
        )
    return tasks


def prepare(args: PrepareOptions) -> Path:
    """Load the dataset, convert, group and write the suite; returns the output directory.

    From a notebook: `prepare(PrepareOptions("gsm8k", "json", "data/gsm8k", data_files=["rows.jsonl"]))`.

    Raises:
        PrepareError: bad arguments, missing fields, or no task with enough examples.
    """
    import datasets

    if args.kind == "generic" and not (args.input_field and args.target_field):
        raise PrepareError("generic source needs --input-field and --target-field")
    if (Path(args.out) / "tasks.json").exists():
        raise PrepareError(
            f"--out {args.out} already holds a task suite (tasks.json): writing there would replace its manifest "
            "and orphan its tasks; choose another directory, or merge suites by listing both in data.suites"
        )
    data_files = args.data_files or None
    for path in data_files or []:
        check_utf8(Path(path))
    try:
        dataset = datasets.load_dataset(args.dataset, args.config, split=args.split, data_files=data_files)
    except Exception as err:  # datasets raises many types for missing ids, files and offline mode
        raise PrepareError(f"cannot load dataset '{args.dataset}' (split {args.split}): {err}") from err
    rows = convert_rows(args.kind, dataset, args)
    tasks = build_tasks(rows, args.max_samples, args.min_samples, args.seed)
    if not tasks:
        raise PrepareError(f"no task with at least {args.min_samples} usable examples in '{args.dataset}'")
    outputs = {(Path(args.out) / name).resolve() for name in ["tasks.json", *(f"{t.name}.jsonl" for t in tasks)]}
    clobbered = sorted(str(f) for f in outputs & {Path(f).resolve() for f in data_files or []})
    if clobbered:
        raise PrepareError(f"--out {args.out} would overwrite the input file(s) {clobbered}: choose another directory")
    return write_suite_dir(tasks, args.out)


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the prepare-data arguments on `parser`."""
    parser.add_argument("kind", choices=sorted(SOURCES), help="how rows become examples")
    parser.add_argument("--dataset", required=True, help="hub id, or a builder name such as json/parquet")
    parser.add_argument("--config", default=None, help="dataset configuration name")
    parser.add_argument("--split", default="train", help="dataset split")
    parser.add_argument("--data-files", nargs="*", default=None, help="local files for json/parquet builders")
    parser.add_argument("--out", required=True, help="output suite directory")
    parser.add_argument("--max-samples", type=positive_int, default=600, help="examples kept per task at most")
    parser.add_argument("--min-samples", type=positive_int, default=10, help="tasks with fewer examples are dropped")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--input-field", default=None, help="generic: the input column")
    parser.add_argument("--target-field", default=None, help="generic: the target column")
    parser.add_argument("--group-by", default=None, help="generic: one task per value of this column")
    parser.add_argument("--options-field", default=None, help="generic: a column with the label set")
    parser.add_argument("--instruction", default="", help="generic: the task instruction")
    parser.add_argument(
        "--item-field", default=None,
        help="generic: a column naming the item an example is a version of (e.g. a translation's source id); "
        "written as the example's group, which every split keeps on one side across tasks",
    )  # fmt: skip
    parser.add_argument("--name", default=None, help="generic: task name when not grouping")
