"""Fault injection on tiny-random: what a careless user does to a run directory, and what the kit must do about it.

Each test is one fault: the kit refuses it with a one-line error that names the file or key, or it detects and
reports it; it never gives a silently wrong result or loses data.
"""

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from smoke import SMOKE

from metalora.cli import main as cli_main
from metalora.config import ConfigError, load_config
from metalora.data.splits import build_splits
from metalora.data.tasks import TaskError, load_suite_dir
from metalora.experiments.compare import run_evaluation
from metalora.experiments.runs import EvaluationError
from metalora.jobs.sweep import run_sweep
from metalora.training.checkpoints import CheckpointError
from metalora.training.train import main as train_main
from metalora.training.train import train

ROOT = Path(__file__).resolve().parent.parent
FAST = [
    "data.heldout_tasks=[add_9,caesar_7]", "eval.n_shots=[0,2]", "eval.seeds=1", "eval.max_test=4",
    "eval.adapt_steps=2", "data.n_test=4", "eval.methods=[base,metalora]",
]  # fmt: skip


def config(tmp_path: Path, name: str = "run", *overrides: str):
    return load_config(SMOKE, [f"train.output_dir={tmp_path}", f"train.run_name={name}", *FAST, *overrides])


# -- resume ------------------------------------------------------------------------------------------------------


# One key of each kind docs/architecture.md says a resume refuses: data, model, LoRA, algorithm (and the method's own
# settings), seeds.
@pytest.mark.parametrize(
    "change, diff",
    [("data.heldout_tasks=[add_9]", r"data.heldout_tasks: \['add_9', 'caesar_7'\] -> \['add_9'\]"),
     ("data.samples_per_task=30", "data.samples_per_task: 40 -> 30"),
     ("model.name=tiny-random-qwen2", "model.name: 'tiny-random' -> 'tiny-random-qwen2'"),
     ("lora.alpha=16", "lora.alpha: 8 -> 16"), ("lora.r=2", "lora.r: 4 -> 2"),
     ("meta.algorithm=reptile", "meta.algorithm: 'metalora' -> 'reptile'"),
     ("meta.inner_steps=3", "meta.inner_steps: 2 -> 3"), ("train.seed=5", "train.seed: 0 -> 5")],
)  # fmt: skip
def test_resume_refuses_a_changed_experiment_with_a_readable_diff(tmp_path, change, diff):
    run_dir = train(config(tmp_path, "r", "train.steps=2"))
    with pytest.raises(CheckpointError, match=f"cannot resume .*: the experiment changed \\({diff}\\)"):
        train(config(tmp_path, "r", "train.steps=3", change), resume=True)
    assert not (run_dir / "checkpoints" / "step_3").exists()


def test_resume_applies_a_changed_optimizer_setting_and_records_it(tmp_path):
    run_dir = train(config(tmp_path, "r", "train.steps=2"))
    train(config(tmp_path, "r", "train.steps=3", "meta.meta_lr=0.5"), resume=True)
    record = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert record[-1]["step"] == 2 and record[-1]["changed"]["meta.meta_lr"] == [0.001, 0.5]
    groups = json.loads((run_dir / "checkpoints" / "step_3" / "optimizer.json").read_text())["param_groups"]
    assert {g["lr"] for g in groups} == {0.5}


def test_a_torn_last_metrics_line_is_skipped_on_resume(tmp_path):
    run_dir = train(config(tmp_path, "r", "train.steps=2"))
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 2, "stage2/meta_lo')
    train(config(tmp_path, "r", "train.steps=3"), resume=True)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


# -- one writer per run directory ------------------------------------------------------------------------------------


def test_a_fresh_run_into_a_used_directory_is_refused(tmp_path):
    run_dir = tmp_path / "used"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(CheckpointError, match=r"used already holds metrics.jsonl"):
        train(config(tmp_path, "used"))


def test_a_second_writer_is_locked_out(tmp_path):
    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(run_dir / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=r"another process is writing into .*locked"):
            train(config(tmp_path, "locked"))
    finally:
        holder.kill()
    assert not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\b"])
def test_run_names_that_leave_the_output_directory_are_refused(name):
    with pytest.raises(ConfigError, match="train.run_name"):
        load_config(overrides=[f"train.run_name={name}"])


# -- evaluation -----------------------------------------------------------------------------------------------------


def test_eval_refuses_a_run_trained_with_other_lora_settings(tmp_path):
    train(config(tmp_path, "run", "lora.alpha=64"))
    with pytest.raises(EvaluationError, match=r"lora.alpha: the run has 64, this evaluation 8"):
        run_evaluation(config(tmp_path, "run"))
    with pytest.raises(EvaluationError, match=r"lora.r: the run has 4, this evaluation 8"):
        run_evaluation(config(tmp_path, "run", "lora.alpha=64", "lora.r=8"))
    with pytest.raises(EvaluationError, match=r"model.name: the run has tiny-random, this evaluation tiny-random-qw"):
        run_evaluation(config(tmp_path, "run", "lora.alpha=64", "model.name=tiny-random-qwen2"))
    with pytest.raises(EvaluationError, match=r"(?s)data.prompt_template: the run has .*Output:, this evaluation Q {"):
        run_evaluation(config(tmp_path, "run", "lora.alpha=64", "data.prompt_template=Q {input} A"))


def test_eval_directory_is_written_whole_or_not_at_all(tmp_path):
    cfg = config(tmp_path, "run", "eval.methods=[base,lora,metalora]")
    out = run_evaluation(cfg, train_missing=True)
    (out / "efficiency.csv").write_text("stale")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A failing evaluation (its adapter is gone) must leave the previous eval directory as it was.
    (cfg.run_dir / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(EvaluationError, match="adapter"):
        run_evaluation(config(tmp_path, "run", "eval.methods=[base,metalora]"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # A second successful evaluation replaces the directory as a unit: nothing stale survives.
    run_evaluation(config(tmp_path, "run", "eval.methods=[base,lora]"))
    assert not (out / "efficiency.csv").exists()


def test_non_finite_adaptation_is_flagged_and_left_out_of_the_summary(tmp_path):
    cfg = config(tmp_path, "run", "eval.methods=[lora]", "eval.adapt_lr=1e30", "meta.inner_optimizer=sgd")
    out = run_evaluation(cfg)
    results = pd.read_csv(out / "results.csv")
    adapted = results[results["n_shots"] == 2]
    assert (~adapted["finite"]).all() and adapted["value"].isna().all()
    summary = pd.read_csv(out / "summary.csv").set_index("n_shots")
    assert summary.loc[2, "n_nonfinite"] == len(adapted) and pd.isna(summary.loc[2, "mean"])
    assert summary.loc[0, "n_nonfinite"] == 0


def test_identical_examples_never_sit_in_two_pools(tmp_path):
    suite = tmp_path / "dups"
    suite.mkdir()
    (suite / "tasks.json").write_text(json.dumps({"tasks": {"a": {}, "b": {}}}))
    for name in "ab":
        lines = [json.dumps({"input": f"{name}{i % 10}", "target": "x"}) for i in range(40)]  # each line 4 times
        (suite / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(overrides=[f"data.suites=[{suite}]", "data.heldout_tasks=[b]", "data.n_test=4",
                                 "data.samples_per_task=6", "meta.n_support=3", "meta.n_query=3"])  # fmt: skip
    experiment = build_splits(cfg.data)
    pools = experiment.heldout["b"]
    assert not {e.input for e in pools.test} & {e.input for e in pools.adapt}
    assert len(pools.test) + len(pools.adapt) == 10 and experiment.duplicates_dropped == {"a": 30, "b": 30}



def test_an_input_with_another_target_never_sits_beside_its_twin_in_the_test_set(tmp_path, caplog):
    suite = tmp_path / "twins"
    suite.mkdir()
    manifest = {"tasks": {"a": {}, "b": {}, "c": {}, "d": {"instruction": "Other."}, "e": {"instruction": "New."}}}
    (suite / "tasks.json").write_text(json.dumps(manifest))
    # Each input twice in a, c, d and e, with two targets (a one-to-many relation); c copies a's lines; d shares half
    # of them under another instruction (answers that coincide, no copy); e is all of a renamed, another instruction.
    rows = {name: [{"input": f"x{i % 10}", "target": f"y{i}"} for i in range(20)] for name in "ace"}
    rows["d"] = [{"input": f"x{i % 10}", "target": f"y{i}" if i % 2 else f"w{i}"} for i in range(20)]
    rows["b"] = [{"input": f"b{i}", "target": "z"} for i in range(20)]
    for name, lines in rows.items():
        (suite / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = load_config(overrides=[f"data.suites=[{suite}]", "data.heldout_tasks=[c,d,e]", "data.n_test=4",
                                 "data.samples_per_task=all", "meta.n_support=1", "meta.n_query=1",
                                 "eval.scenario=seen", "eval.n_shots=[0,1]"])  # fmt: skip
    with caplog.at_level("WARNING", logger="metalora"):
        experiment = build_splits(cfg.data, cfg.eval.scenario)
    for pools in [*experiment.heldout.values(), *experiment.seen.values()]:
        assert not {e.input for e in pools.test} & {e.input for e in pools.adapt}, pools.task.name
    train_a = experiment.train["a"]
    assert not {e.input for e in experiment.seen["a"].test} & {e.input for e in train_a.support + train_a.query}
    assert "task 'c':" in caplog.text and "training examples of task 'a'" in caplog.text
    assert re.search(r"task 'e': \d+ of its \d+ evaluated \(input, target\) pairs are examples of training task 'a' "
                     r"under another instruction", caplog.text)  # fmt: skip
    assert "task 'b':" not in caplog.text and "task 'd':" not in caplog.text


# -- checkpoints ----------------------------------------------------------------------------------------------------


def test_a_fresh_run_does_not_write_through_a_dangling_link(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(CheckpointError, match=r"metrics.jsonl is a symbolic link \(to .*elsewhere.jsonl\)"):
        train(config(tmp_path, "r", "train.steps=1"))
    assert not (tmp_path / "elsewhere.jsonl").exists()


def test_a_flipped_byte_in_a_checkpoint_is_detected(tmp_path):
    run_dir = train(config(tmp_path, "r", "train.steps=2"))
    weights = run_dir / "checkpoints" / "step_2" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: safetensors would load it without complaint
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors.*checksum"):
        train(config(tmp_path, "r", "train.steps=3"), resume=True)
    # Its checksum record deleted too: refused all the same, not resumed from unverified weights.
    (weights.parent.parent / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match=r"step_2 has no checksums.json, so its weights cannot be verified"):
        train(config(tmp_path, "r", "train.steps=3"), resume=True)


# -- sweeps ---------------------------------------------------------------------------------------------------------


def _sweep(tmp_path: Path, values: list[int], key: str = "meta.n_support") -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps({
        "notebook": "notebooks/02_few_shot_eval.ipynb", "config_files": [str(p) for p in SMOKE],
        "overrides": [*FAST, "eval.methods=[metalora]"], "grid": {key: values},
        "output_dir": str(tmp_path / "sweeps"),
    }))  # fmt: skip
    return path


@pytest.mark.slow
def test_an_edited_sweep_reruns_points_whose_config_changed_and_failures_exit_non_zero(tmp_path):
    path = _sweep(tmp_path, [4])
    root, _ = run_sweep(path, executor="debug")
    first = json.loads((root / "meta.n_support=4" / "point.json").read_text())
    spec = json.loads(path.read_text())
    spec["overrides"].append("lora.r=2")  # same point name, another experiment
    path.write_text(json.dumps(spec))
    run_sweep(path, executor="debug")
    again = json.loads((root / "meta.n_support=4" / "point.json").read_text())
    assert again["config"] != first["config"] and "r: 2" in again["config"]
    # Edited a second time: both earlier versions are kept.
    spec["overrides"].append("lora.alpha=4")
    path.write_text(json.dumps(spec))
    run_sweep(path, executor="debug")
    kept = sorted(p.name for p in root.glob(".meta.n_support=4.replaced-*"))
    assert kept == [".meta.n_support=4.replaced-1", ".meta.n_support=4.replaced-2"]
    versions = [json.loads((root / name / "point.json").read_text())["config"] for name in kept]
    assert versions == [first["config"], again["config"]]
    # Two points side by side as local jobs, one per device, each with its own log; the second asks for more tasks
    # per meta-batch than the suite has, which only the data can tell.
    began = time.time()
    assert cli_main(["sweep", str(_sweep(tmp_path, [2, 999], "meta.meta_batch_size")), "--devices", "0,1"]) == 1
    names = ("meta.meta_batch_size=2", "meta.meta_batch_size=999")
    records = {p: json.loads((root / p / "point.json").read_text()) for p in names}
    assert {r["device"] for r in records.values()} == {"0", "1"}
    assert records[names[0]]["status"] == "ok" and records[names[1]]["status"] == "failed"
    logs = [path.read_text() for path in (root / "jobs").glob("*_0_log.out") if path.stat().st_mtime >= began]
    # A job per device (one point each), then the aggregation's.
    assert len(logs) == 3 and any("run directory:" in log for log in logs)


# -- task data and suites -------------------------------------------------------------------------------------------


def _suite(tmp_path: Path, manifest: dict, files: dict[str, bytes]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": manifest}))
    for name, data in files.items():
        (tmp_path / f"{name}.jsonl").write_bytes(data)
    return tmp_path


def test_task_names_that_leave_the_suite_are_refused(tmp_path):
    with pytest.raises(TaskError, match=r"task '../escape': a task name must be a plain file name"):
        load_suite_dir(_suite(tmp_path / "s", {"../escape": {}}, {}))


def test_a_non_utf8_task_file_names_file_and_line(tmp_path):
    lines = b'{"input": "a", "target": "b"}\n{"input": "\xff", "target": "b"}\n'
    suite = _suite(tmp_path / "s", {"t": {}}, {"t": lines})
    with pytest.raises(TaskError, match=r"t\.jsonl: line 2: not UTF-8"):
        load_suite_dir(suite)


def test_accuracy_without_options_is_refused(tmp_path):
    suite = _suite(tmp_path / "s", {"t": {"metric": "accuracy"}}, {"t": b'{"input": "a", "target": "b"}\n'})
    with pytest.raises(TaskError, match=r"task 't': metric 'accuracy' needs 'options'"):
        load_suite_dir(suite)


def test_prepare_data_refuses_to_overwrite_a_suite(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}", "a": "x"}) + "\n" for i in range(4)))
    out = _suite(tmp_path / "suite", {"old": {}}, {"old": b'{"input": "a", "target": "b"}\n'})
    args = ["prepare-data", "generic", "--dataset", "json", "--data-files", str(data), "--out", str(out),
            "--input-field", "q", "--target-field", "a", "--min-samples", "2"]  # fmt: skip
    assert cli_main(args) == 2
    assert "already holds a task suite" in capsys.readouterr().err
    assert set(json.loads((out / "tasks.json").read_text())["tasks"]) == {"old"}


def test_long_targets_are_reported(tmp_path, caplog):
    suite = _suite(tmp_path / "s", {"t": {}, "u": {}}, {
        "t": "".join(json.dumps({"input": f"{i}", "target": "word " * 60}) + "\n" for i in range(20)).encode(),
        "u": "".join(json.dumps({"input": f"{i}", "target": "x"}) + "\n" for i in range(20)).encode(),
    })  # fmt: skip
    cfg = load_config(SMOKE, [f"train.output_dir={tmp_path}", f"data.suites=[{suite}]", "data.train_tasks=[t,u]",
                              "data.samples_per_task=10", "train.steps=1", "meta.n_support=2",
                              "meta.n_query=2"])  # fmt: skip
    with caplog.at_level("WARNING", logger="metalora"):
        train(cfg)
    assert any("task 't'" in r.message and "data.max_target_tokens=32" in r.message for r in caplog.records)
    assert not any("task 'u'" in r.message for r in caplog.records)


# -- one-line errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.r=[4", r"override 'lora.r=\[4'"),
        ("train.log_with=[tensorbored]", r"train.log_with.*tensorbored"),
        ("data.prompt_template={instruction} {question} {input}", r"data.prompt_template.*\{question\}"),
        ("lora.target_modules=[q_proj,qkv]", r"lora.target_modules.*'qkv'"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, capsys, override, message):
    code = train_main([*map(str, SMOKE), f"train.output_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_an_empty_prompt_is_a_one_line_error_naming_the_example(tmp_path, capsys):
    lines = "".join(json.dumps({"input": "" if i % 3 == 0 else f"x{i}", "target": "y"}) + "\n" for i in range(30))
    suite = _suite(tmp_path / "s", {"a": {}, "b": {}}, {"a": lines.encode(), "b": lines.encode()})
    code = train_main([*map(str, SMOKE), f"train.output_dir={tmp_path}", f"data.suites=[{suite}]",
                       "data.train_tasks=[a,b]", "data.samples_per_task=20", 'data.prompt_template="{input}"',
                       "data.use_instruction=false", "speed.pack_tokens=256"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.search(r"task '[ab]', example [ab]:\d+: the prompt is empty", err)


def test_a_model_directory_without_a_model_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty_model").mkdir()
    code = train_main([*map(str, SMOKE), f"train.output_dir={tmp_path}", f"model.name={tmp_path / 'empty_model'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "empty_model" in err and "Traceback" not in err


def test_unwritable_outputs_are_one_line_errors(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert train_main([*map(str, SMOKE), f"train.output_dir={blocker}"]) == 2
    err = capsys.readouterr().err
    assert "file" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_outputs_keep_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_dir = train(config(tmp_path, "shared", "train.steps=1"))
    finally:
        os.umask(old)
    for path in (run_dir / "config.yaml", run_dir / "summary.json", run_dir / "checkpoints" / "step_1"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{path} is {oct(mode)}: unreadable to collaborators"


def test_an_unknown_attention_kernel_is_named_without_a_traceback():
    from metalora.config import ModelConfig
    from metalora.modeling.models import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="bad value for 'model.attn_implementation': 'flashy'"):
        load_model(ModelConfig(name="tiny-random", attn_implementation="flashy"))


@pytest.mark.parametrize("devices", ["a,b", "0,0", "1,-1"])
def test_sweep_devices_must_be_distinct_gpu_indices(tmp_path, devices, capsys):
    assert cli_main(["sweep", str(_sweep(tmp_path, [4])), "--devices", devices]) == 2
    assert f"--devices {devices}: expected distinct GPU indices" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("value", ["-1", "0", "many"])
def test_prepare_data_sample_counts_must_be_positive(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli_main(["prepare-data", "gsm8k", "--dataset", "json", "--max-samples", value, "--out", str(tmp_path / "o")])
    assert stopped.value.code == 2 and f"expected an integer > 0, got '{value}'" in capsys.readouterr().err


# -- a run is judged by its own record ------------------------------------------------------------------------------


def test_a_run_is_labelled_and_checked_by_its_own_record(tmp_path):
    run_dir = train(config(tmp_path, "run"))
    reptile = train(config(tmp_path, "rep", "meta.algorithm=reptile"))
    # Evaluated under another train.seed, the seed-0 run keeps its own label; its steps and seed are recorded.
    out = run_evaluation(config(tmp_path, "run", "train.seed=7"))
    assert set(pd.read_csv(out / "results.csv").query("method == 'metalora'")["train_seed"]) == {0}
    recorded = {"method": "metalora", "train_seed": 0, "steps": 3, "run_dir": str(run_dir),
                "weights": str(run_dir / "adapter")}  # fmt: skip
    assert json.loads((out / "runs.json").read_text()) == [recorded]
    with pytest.raises(EvaluationError, match="was trained with meta.algorithm=reptile, not metalora"):
        run_evaluation(config(tmp_path, "run", f"eval.runs={{metalora: {reptile}}}"))
    with pytest.raises(EvaluationError, match="trained 3 steps, but this config plans 50"):
        run_evaluation(config(tmp_path, "run", "train.steps=50"))
    (run_dir / "adapter" / "checksums.json").unlink()
    with pytest.raises(EvaluationError, match="has no checksums.json, so its weights cannot be verified"):
        run_evaluation(config(tmp_path, "run"))
    (run_dir / "config.yaml").unlink()
    with pytest.raises(EvaluationError, match="has no config.yaml: without the run's own record"):
        run_evaluation(config(tmp_path, "run"))


def test_a_fomaml_model_is_written_with_checksums_and_verified_before_evaluation(tmp_path):
    run_dir = train(config(tmp_path, "run", "meta.algorithm=fomaml", "train.steps=1"))
    assert (run_dir / "model" / "checksums.json").is_file()
    weights = run_dir / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(EvaluationError, match="model.safetensors: content does not match its checksum"):
        run_evaluation(config(tmp_path, "run", "meta.algorithm=fomaml", "train.steps=1", "eval.methods=[base,fomaml]"))


# -- one-line errors where tracebacks were --------------------------------------------------------------------------


def test_an_interpolation_that_resolves_to_nothing_is_named(tmp_path):
    from metalora.config import ConfigError

    with pytest.raises(ConfigError, match=r"parameters: bad value for 'lora.r'.*nothing"):
        load_config(SMOKE, ["lora.r=${nothing}"])


def test_a_task_manifest_that_is_not_utf8_is_named(tmp_path):
    from metalora.data.tasks import TaskError, load_suite_dir

    (tmp_path / "tasks.json").write_bytes(b'{"tasks": {"t\\xff": {}}}'.replace(b"\\xff", b"\xff"))
    with pytest.raises(TaskError, match=r"tasks.json: not UTF-8"):
        load_suite_dir(tmp_path)


def test_a_truncated_splits_record_is_an_evaluation_error(tmp_path):
    run_dir = train(config(tmp_path, "run"))
    (run_dir / "splits.json").write_text('{"train": {"add')
    with pytest.raises(EvaluationError, match="splits.json is missing or unreadable"):
        run_evaluation(config(tmp_path, "run"))


def test_a_swept_value_holding_a_path_is_named_with_how_to_name_its_point(tmp_path):
    from metalora.experiments.sweep import load_sweep

    path = _sweep(tmp_path, [["params/suites/a"]], key="data.suites")
    with pytest.raises(ConfigError, match=r"point 'data.suites=\[params/suites/a\]': .* give such values a name with "
                                          r"`cases`"):  # fmt: skip
        load_sweep(path)


def test_a_sweep_file_with_a_yaml_error_is_named(tmp_path):
    from metalora.config import ConfigError
    from metalora.experiments.sweep import load_sweep

    path = tmp_path / "bad.yaml"
    path.write_text("notebook: x.ipynb\ngrid: {lora.r: [2, 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: cannot parse YAML"):
        load_sweep(path)


def test_a_model_folder_with_pickle_weights_only_is_refused(tmp_path):
    from metalora.config import ModelConfig
    from metalora.modeling.models import ModelLoadError, load_model, tiny_tokenizer

    model, _ = load_model(ModelConfig(name="tiny-random"), weight_first_logits=False)
    model.config.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle weights only .*pytorch_model.bin.*safetensors only"):
        load_model(ModelConfig(name=str(tmp_path)))


def test_a_file_is_written_under_a_temporary_name_and_only_then_renamed(tmp_path, monkeypatch):
    import metalora.io as io

    target = tmp_path / "summary.json"
    target.write_text("old")
    seen = []

    def rename_fails(source, destination):
        # At the rename the new content is whole, under another name, and the old file is untouched.
        seen.append((Path(source).name, Path(source).read_text(), Path(destination).read_text()))
        raise OSError("the disk vanished")

    monkeypatch.setattr(io.os, "replace", rename_fails)
    with pytest.raises(OSError, match="vanished"):
        io.atomic_write_text(target, "new and complete")
    assert seen and seen[0][0].startswith(".summary.json.") and seen[0][1:] == ("new and complete", "old")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_an_evaluation_interrupted_while_writing_its_tables_leaves_eval_as_it_was(tmp_path, monkeypatch):
    import metalora.experiments.compare as compare

    cfg = config(tmp_path, "run", "eval.methods=[base,lora]")
    out = compare.run_evaluation(cfg)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def figure_fails(*_args, **_kwargs):
        raise KeyboardInterrupt  # a kill while the new eval/ is half written

    monkeypatch.setattr(compare, "per_task_figure", figure_fails)
    with pytest.raises(KeyboardInterrupt):
        compare.run_evaluation(config(tmp_path, "run", "eval.methods=[base,lora]", "eval.seeds=2"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p.name for p in cfg.run_dir.iterdir() if p.name.startswith((".eval.tmp", ".eval.old"))]
    # The first evaluation of a run interrupted the same way leaves no eval/ at all.
    fresh = config(tmp_path, "fresh", "eval.methods=[base,lora]")
    with pytest.raises(KeyboardInterrupt):
        compare.run_evaluation(fresh)
    assert not (fresh.run_dir / "eval").exists()


def test_a_directory_swap_cut_between_its_renames_is_restored_by_the_next_write(tmp_path):
    from metalora.io import atomic_directory

    target = tmp_path / "eval"
    with atomic_directory(target) as tmp:
        (tmp / "results.csv").write_text("first")
    # A crash after the old version was moved aside and before the new one was renamed in.
    target.rename(tmp_path / ".eval.old")
    with pytest.raises(RuntimeError), atomic_directory(target):
        assert (target / "results.csv").read_text() == "first", "the previous version is back before the write"
        raise RuntimeError("this write fails too")
    assert (target / "results.csv").read_text() == "first" and not (tmp_path / ".eval.old").exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_loses_no_checkpoint(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import metalora.training.checkpoints as checkpoints

    real = checkpoints.save_file
    calls = []

    def full_after_the_first_checkpoint(tensors, path, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, path, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", full_after_the_first_checkpoint)
    args = [*map(str, SMOKE), f"train.output_dir={tmp_path}", "train.steps=4", "train.checkpoint_every=2"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "step_4: cannot write the checkpoint" in errors[0] and "StorageFull" in errors[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "smoke" / "checkpoints").iterdir()) == ["step_2"]


def test_a_resume_without_the_runs_config_is_refused(tmp_path):
    run_dir = train(config(tmp_path, "r", "train.steps=2"))
    (run_dir / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="config.yaml is missing: the kit cannot tell"):
        train(config(tmp_path, "r", "train.steps=3", "data.split_seed=5"), resume=True)
