"""The training entry point: outputs, determinism, resume, errors and multi-process equivalence."""

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import assert_close_at_scale
from safetensors.torch import load_file
from smoke import SMOKE

from metalora.config import ConfigError, load_config
from metalora.training.checkpoints import CheckpointError
from metalora.training.train import TrainingDivergedError, main, train

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path: Path, name: str, *overrides: str, resume: bool = False) -> Path:
    cfg = load_config(SMOKE, [f"train.output_dir={tmp_path}", f"train.run_name={name}", *overrides])
    return train(cfg, resume=resume)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_directory_holds_config_metrics_checkpoints_and_adapter(tmp_path):
    run_dir = run(tmp_path, "r")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    for key in ("stage2/meta_loss", "adaptation_gap", "system/peak_memory_mb", "system/time_per_step_s"):
        assert key in lines[0]
    assert any(k.startswith("stage1/") and k.endswith("/loss_first") for k in lines[0])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_3"]
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert load_config([run_dir / "config.yaml"]).train.run_name == "r"
    splits = json.loads((run_dir / "splits.json").read_text())
    for pools in splits["train"].values():
        assert not set(pools["support"]) & set(pools["query"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_weights_bytes"] > 0 and summary["trainable_parameters"] > 0
    assert all(m["stage2/grad_norm"] > 0 for m in lines)
    # The base count is the frozen model alone: adding the LoRA weights gives the peft model's total.
    from metalora.modeling.models import count_parameters, load_model

    base, _ = load_model(load_config(SMOKE).model)
    assert summary["base_parameters"] == count_parameters(base)["total"]


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    ballast = bytearray(600 * 2**20)  # the parent's peak, which ru_maxrss would hand down to the child
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    code = ("import torch; from metalora.training.train import peak_memory_mb; "
            "print(peak_memory_mb(torch.device('cpu')))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 500 < len(ballast) / 2**20


def test_trackers_record_the_resolved_config_under_the_run_name(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = run(tmp_path, "tracked", "train.log_with=[tensorboard]")
    hparams = {}
    for directory in {f.parent for f in (run_dir / "tracked").rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(directory))
        accumulator.Reload()
        try:
            content = accumulator.PluginTagToContent("hparams")
        except KeyError:  # the scalars file holds no hparams
            continue
        if "_hparams_/session_start_info" in content:
            data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
            hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                       for k, v in data.session_start_info.hparams.items()}  # fmt: skip
    assert hparams["lora.r"] == 4 and hparams["train.run_name"] == "tracked"
    assert json.loads(hparams["lora.target_modules"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_same_seed_gives_the_same_adapter_and_another_seed_does_not(tmp_path):
    a, b = run(tmp_path, "a"), run(tmp_path, "b")
    assert_same(adapter(a), adapter(b))
    c = adapter(run(tmp_path, "c", "train.seed=1"))
    assert any(not torch.equal(c[k], v) for k, v in adapter(a).items())


def test_stop_and_resume_equals_one_uninterrupted_run(tmp_path):
    whole = run(tmp_path, "whole", "train.steps=6", "train.checkpoint_every=0")
    run(tmp_path, "parts", "train.steps=3", "train.checkpoint_every=0")
    parts = run(tmp_path, "parts", "train.steps=6", "train.checkpoint_every=0", resume=True)
    assert_same(adapter(whole), adapter(parts))
    steps = [json.loads(line)["step"] for line in (parts / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))


def logged(run_dir: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_meta_learning_rate_warms_up_then_follows_its_schedule(tmp_path):
    linear = run(tmp_path, "linear", "train.steps=6", "meta.lr_scheduler=linear", "meta.warmup_steps=2")
    assert logged(linear, "stage2/lr") == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    cosine = logged(run(tmp_path, "cosine", "train.steps=6", "meta.lr_scheduler=cosine"), "stage2/lr")
    assert cosine[0] == pytest.approx(1e-3) and cosine[3] == pytest.approx(5e-4)
    assert all(a > b for a, b in itertools.pairwise(cosine))
    assert logged(run(tmp_path, "constant", "train.steps=3"), "stage2/lr") == [1e-3] * 3
    # A warmup as long as the run would keep every step below the peak rate: refused before any step.
    with pytest.raises(ConfigError, match=r"meta.warmup_steps=6 is not shorter than this metalora run's 6 steps"):
        run(tmp_path, "all_warmup", "train.steps=6", "meta.warmup_steps=6")


# Killed at step 3: after a warmup of 2 steps, or inside one of 5.
@pytest.mark.parametrize("warmup", [2, 5])
def test_a_scheduled_run_stopped_after_a_checkpoint_resumes_bit_exactly(tmp_path, warmup):
    settings = ["train.steps=6", "train.checkpoint_every=3", "meta.lr_scheduler=cosine", f"meta.warmup_steps={warmup}"]
    whole = run(tmp_path, "whole", *settings)
    # The same run killed between its checkpoints at steps 3 and 6: only step 3 and the first lines remain.
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for later in ("checkpoints/step_6", "adapter"):
        shutil.rmtree(cut / later)
    (cut / "summary.json").unlink()
    resumed = run(tmp_path, "cut", *settings, resume=True)
    assert_same(adapter(whole), adapter(resumed))
    assert logged(resumed, "stage2/lr") == logged(whole, "stage2/lr")


def test_resume_errors_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(tmp_path, "none", resume=True)
    run_dir = run(tmp_path, "r")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        run(tmp_path, "r")
    (run_dir / "checkpoints" / "step_3" / "optimizer.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"step_3/optimizer.safetensors: content does not match its checksum"):
        run(tmp_path, "r", "train.steps=4", resume=True)


def test_a_diverging_loss_stops_with_a_clear_error_after_saving(tmp_path):
    with pytest.raises(TrainingDivergedError, match="non-finite loss at step 0"):
        run(tmp_path, "nan", "meta.inner_optimizer=sgd", "meta.inner_lr=1e30", "meta.inner_steps=3")
    assert (tmp_path / "nan" / "checkpoints" / "step_0" / "state.json").is_file()


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    code = main([*map(str, SMOKE), f"train.output_dir={tmp_path}", "meta.meta_batch_size=999"])
    assert code == 2
    assert "meta_batch_size=999 is larger than" in capsys.readouterr().err


def test_a_bfloat16_base_trains_float32_adapters(tmp_path):
    run_dir = run(tmp_path, "bf16", "model.dtype=bfloat16", "train.steps=2")
    weights = adapter(run_dir)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    # B starts at zero: a non-zero B is a step that moved the adapter (a bf16 rounding could have swallowed it).
    assert all(float(t.abs().max()) > 0 for name, t in weights.items() if "lora_B" in name)
    losses = [json.loads(line)["stage2/meta_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < loss < 100 for loss in losses)


def test_only_the_newest_checkpoints_are_kept_when_asked(tmp_path):
    run_dir = run(tmp_path, "k", "train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_4", "step_5"]
    every = run(tmp_path, "all", "train.steps=3", "train.checkpoint_every=1")
    assert len(list((every / "checkpoints").iterdir())) == 3


def test_distributed_engines_and_idle_processes_are_refused():
    from types import SimpleNamespace

    from metalora.training.train import check_distributed

    cfg = load_config(SMOKE)
    check_distributed(cfg, SimpleNamespace(distributed_type="MULTI_GPU", num_processes=2))
    with pytest.raises(ConfigError, match="distributed type FSDP is not supported"):
        check_distributed(cfg, SimpleNamespace(distributed_type="FSDP", num_processes=2))
    with pytest.raises(ConfigError, match=r"meta.meta_batch_size=2 is smaller than the 4 processes"):
        check_distributed(cfg, SimpleNamespace(distributed_type="MULTI_GPU", num_processes=4))
    with pytest.raises(ConfigError, match="fp16 needs a gradient scaler"):
        load_config(SMOKE, ["train.mixed_precision=fp16"])


def test_fomaml_checkpoint_is_the_full_model_in_safetensors(tmp_path):
    run_dir = run(tmp_path, "f", "meta.algorithm=fomaml", "train.steps=1")
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step_1" / "model" / "model.safetensors").is_file()


@pytest.mark.numerics
@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    single = run(tmp_path, "single", "meta.meta_batch_size=4", "train.steps=2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "params" / "accelerate" / "cpu_2proc.yaml"),
        "-m", "metalora.training.train", *map(str, SMOKE), "train.cpu=true",
        f"train.output_dir={tmp_path}", "train.run_name=double", "meta.meta_batch_size=4", "train.steps=2",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "double" / "summary.json").read_text())
    assert summary["processes"] == 2
    one, two = adapter(single), adapter(tmp_path / "double")
    for key in one:
        assert_close_at_scale(two[key], one[key])


def test_history_is_never_rewritten(tmp_path, capsys):
    run_dir = run(tmp_path, "done", "train.steps=4", "train.checkpoint_every=2")
    # A resume that plans fewer steps than the latest checkpoint would save step-4 weights as step_2.
    with pytest.raises(CheckpointError, match=r"latest checkpoint is at step 4, but this config plans 2 steps"):
        run(tmp_path, "done", "train.steps=2", "train.checkpoint_every=2", resume=True)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_4"]
    # Resuming a finished run changes no file.
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    run(tmp_path, "done", "train.steps=4", "train.checkpoint_every=2", resume=True)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()} == files
    assert "already finished its 4 steps: nothing to do, nothing rewritten" in capsys.readouterr().out


def test_a_run_stopped_before_its_first_checkpoint_says_how_to_start_over(tmp_path):
    run_dir = run(tmp_path, "early", "train.steps=1")
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match="stopped before its first checkpoint.*to start over, remove the dir"):
        run(tmp_path, "early")
    with pytest.raises(CheckpointError, match="no checkpoint.*to start over, remove the directory"):
        run(tmp_path, "early", resume=True)
