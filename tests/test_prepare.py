"""prepare-data through `datasets.load_dataset` on local fixture files (the same path as hub ids)."""

import json
import re

import pytest

from metalora.cli import main
from metalora.data.prepare import gsm8k_answer, last_boxed
from metalora.data.tasks import load_suite_dir


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path, kind, rows, *extra):
    data = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
    out = tmp_path / f"suite_{kind}"
    code = main(["prepare-data", kind, "--dataset", "json", "--data-files", str(data), "--out", str(out),
                 "--min-samples", "2", *extra])  # fmt: skip
    assert code == 0
    return load_suite_dir(out)


def test_answer_extraction():
    assert last_boxed(r"so $x = \boxed{\frac{1}{2}}$, not \boxed{3}") == "3"
    assert last_boxed(r"answer \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed("no box") is None
    assert gsm8k_answer("3 + 4 = 7\n#### 1,234") == "1234"
    assert gsm8k_answer("no marker") is None


def test_math_one_task_per_subject(tmp_path):
    rows = [
        {"problem": "1+1?", "solution": r"It is \boxed{2}.", "type": "Algebra"},
        {"problem": "2+2?", "solution": r"\boxed{4}", "type": "Algebra"},
        {"problem": "area?", "solution": r"\boxed{\pi}", "type": "Geometry"},
        {"problem": "x?", "solution": r"\boxed{9}", "type": "Geometry"},
        {"problem": "skip", "solution": "no boxed answer", "type": "Geometry"},
    ]
    suite = run(tmp_path, "math", rows)
    assert sorted(suite.tasks) == ["math_algebra", "math_geometry"]
    assert sorted(e.target for e in suite.tasks["math_geometry"].examples) == ["9", r"\pi"]


def test_gsm8k(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"work\n#### {i},000"} for i in range(3)]
    suite = run(tmp_path, "gsm8k", rows)
    assert sorted(e.target for e in suite.tasks["gsm8k"].examples) == ["0000", "1000", "2000"]


def test_scienceqa_per_subject_with_choices_in_the_input(tmp_path):
    rows = [
        {"question": "Which is a metal?", "choices": ["iron", "wood"], "answer": 0, "subject": "natural science"},
        {"question": "Which is a gas?", "choices": ["rock", "air", "milk"], "answer": 1, "subject": "natural science"},
        {"question": "Which is warmer?", "choices": ["A", "B"], "answer": 1, "subject": "natural science",
         "hint": "A is 3 C, B is 30 C."},
    ]  # fmt: skip
    task = run(tmp_path, "scienceqa", rows).tasks["scienceqa_natural_science"]
    targets = {e.input: e.target for e in task.examples}
    assert targets["Which is a gas? Options: (A) rock (B) air (C) milk"] == "air"
    assert targets["Context: A is 3 C, B is 30 C. Which is warmer? Options: (A) A (B) B"] == "B"


def test_natural_instructions_one_task_per_task_file(tmp_path):
    rows = [
        {"task_name": "task001_copy", "definition": ["Copy the input."], "inputs": f"w{i}", "targets": [f"w{i}"]}
        for i in range(3)
    ]
    task = run(tmp_path, "natural-instructions", rows).tasks["task001_copy"]
    assert task.instruction == "Copy the input." and len(task.examples) == 3


def test_generic_with_grouping_and_options(tmp_path):
    rows = [{"text": f"t{i}", "label": ["neg", "pos"][i % 2], "labels": ["neg", "pos"], "src": "a"} for i in range(6)]
    suite = run(tmp_path, "generic", rows, "--input-field", "text", "--target-field", "label",
                "--group-by", "src", "--options-field", "labels", "--max-samples", "4")  # fmt: skip
    task = suite.tasks["a"]
    assert task.options == ["neg", "pos"] and task.metric == "accuracy" and len(task.examples) == 4


def test_generic_items_become_groups_that_survive_the_round_trip(tmp_path):
    rows = [{"text": f"{lang} {i}", "label": "x", "idx": i, "lang": lang} for lang in ("de", "fr") for i in range(3)]
    suite = run(tmp_path, "generic", rows, "--input-field", "text", "--target-field", "label",
                "--group-by", "lang", "--item-field", "idx")  # fmt: skip
    for lang in ("de", "fr"):
        assert {e.input: e.group for e in suite.tasks[lang].examples} == {f"{lang} {i}": f"idx:{i}" for i in range(3)}


def test_a_missing_field_is_named(tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    code = main(["prepare-data", "gsm8k", "--dataset", "json", "--data-files", str(data), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "row 0: field(s) ['answer'] missing" in capsys.readouterr().err


def test_an_unreachable_dataset_is_a_clear_error(tmp_path, capsys):
    code = main(["prepare-data", "gsm8k", "--dataset", "no-org/no-dataset", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "cannot load dataset 'no-org/no-dataset'" in capsys.readouterr().err


def test_generic_needs_its_fields(tmp_path, capsys):
    data = write_jsonl(tmp_path / "x.jsonl", [{"a": 1}])
    args = ["prepare-data", "generic", "--dataset", "json", "--data-files", str(data), "--out", str(tmp_path)]
    assert main(args) == 2
    assert "--input-field and --target-field" in capsys.readouterr().err


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"question": "a", "answer": "#### 1"}\n{"question": "caf\xe9", "answer": "#### 2"}\n')
    code = main(["prepare-data", "gsm8k", "--dataset", "json", "--data-files", str(data), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{data}: line 2 is not UTF-8 (byte 0xe9 at column 18)" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_prepare_data_never_writes_over_its_input(tmp_path, capsys):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(3)])
    before = data.read_bytes()
    code = main(["prepare-data", "gsm8k", "--dataset", "json", "--data-files", str(data), "--out", str(tmp_path),
                 "--min-samples", "2"])  # fmt: skip
    assert code == 2 and "would overwrite the input file(s)" in capsys.readouterr().err
    assert data.read_bytes() == before


def test_prepare_runs_from_a_notebook_without_argparse(tmp_path):
    from metalora.data.prepare import PrepareOptions, prepare

    data = write_jsonl(tmp_path / "rows.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(3)])
    out = prepare(PrepareOptions("gsm8k", "json", str(tmp_path / "suite"), data_files=[str(data)], min_samples=2))
    assert sorted(e.target for e in load_suite_dir(out).tasks["gsm8k"].examples) == ["0", "1", "2"]


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([{"q": None, "a": "x"}], [], r"row 0: field\(s\) \['q'\] are null"),
        ([{"q": "1", "a": "x", "g": "A b"}, {"q": "2", "a": "y", "g": "a-b"}], ["--group-by", "g"],
         r"row 1: --group-by values 'A b' and 'a-b' both become task 'a_b'"),
        ([{"q": "1", "a": "maybe", "o": ["yes", "no"]}], ["--options-field", "o"],
         r"row 0: target 'maybe' is not among its options \['yes', 'no'\]"),
    ],
)  # fmt: skip
def test_prepare_data_refuses_what_it_could_not_read(tmp_path, capsys, rows, extra, message):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    code = main(["prepare-data", "generic", "--dataset", "json", "--data-files", str(data), "--out",
                 str(tmp_path / "suite"), "--input-field", "q", "--target-field", "a", "--min-samples", "1",
                 *extra])  # fmt: skip
    assert code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "suite").exists()
