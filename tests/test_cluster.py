"""The kit's jobs against a real one-node SLURM (`make test-cluster` starts it with tests/slurm/local_slurm.sh and stops
it afterwards): plans, requeues, cancelled shards, sweeps, a two-process training job, refused settings."""

import getpass
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from numerics import assert_close_at_scale
from safetensors.torch import load_file
from smoke import SMOKE

from metalora.config import ConfigError, load_config, save_config
from metalora.evaluation.samples import POINT_COLUMNS, load_samples
from metalora.experiments.compare import run_evaluation
from metalora.experiments.journal import JOURNAL
from metalora.jobs.executor import make_executor, single_process_shape, training_shape
from metalora.jobs.submit import submit_plan
from metalora.jobs.sweep import run_sweep
from metalora.jobs.work import EvaluationShardJob, TrainingJob
from metalora.training.train import train

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
SLURM = ["cluster.executor=slurm", "cluster.time_min=20"]
UNTRAINED = ["eval.methods=[base,lora]", "eval.seeds=3", "eval.n_shots=[0,4,8]"]


@pytest.fixture(autouse=True)
def slurm():
    """A running SLURM, and no job of this user left queued after the test, whatever its outcome."""
    if shutil.which("sbatch") is None or not os.environ.get("SLURM_CONF"):
        if os.environ.get("METALORA_REQUIRE_SLURM"):
            pytest.fail("METALORA_REQUIRE_SLURM is set but there is no SLURM (sbatch on PATH and SLURM_CONF)")
        pytest.skip("no SLURM here: `make test-cluster` starts one")
    yield
    subprocess.run(["scancel", "--user", getpass.getuser()], check=False)
    wait_for_jobs(timeout=60)


def queue() -> list[tuple[str, str, str]]:
    """(job id, state, reason) of every job of this user SLURM still holds."""
    out = subprocess.run(["squeue", "-h", "--user", getpass.getuser(), "-o", "%i|%T|%r"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]


def wait_for_jobs(timeout: float = 600, until=None) -> None:
    """Wait until this user's queue is empty (or `until()` holds). A requeued job waits about two minutes before it
    may start again: this test's jobs are released at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = queue()
        if (until is not None and until()) or (until is None and not jobs):
            return
        for job_id, state, reason in jobs:
            if state == "PENDING" and reason == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
        time.sleep(0.2)
    raise TimeoutError(f"jobs still queued after {timeout} s: {queue()}")


def config(tmp_path, *overrides):
    return load_config(SMOKE, [f"train.output_dir={tmp_path}", *overrides])


def results(eval_dir):
    return pd.read_csv(eval_dir / "results.csv").drop(columns="adapt_seconds")


def answers(run_dir):
    """The per-item answers of an evaluation, in point and item order (shards gather them in another)."""
    return load_samples(run_dir).sort_values([*POINT_COLUMNS, "item"], ignore_index=True)


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def submit_training(cfg, folder):
    path = save_config(cfg, folder / "configs" / cfg.train.run_name)
    return make_executor(cfg.cluster, folder / "jobs", training_shape(cfg.cluster)).submit(TrainingJob(), str(path))


def test_a_plan_submitted_to_slurm_writes_the_tables_of_one_process(tmp_path, one_thread):
    single = results(run_evaluation(config(tmp_path / "one"), train_missing=True))
    cfg = config(tmp_path / "slurm", *SLURM, "cluster.eval_shards=3")
    submission = submit_plan(cfg)
    training, evaluation, report = submission.stages.values()
    # A job array per stage, each waiting on the one before.
    assert len(training) == 2 and len(evaluation) == 3 and len(report) == 1
    assert len({job.split("_")[0] for job in training}) == 1
    wait_for_jobs()
    pd.testing.assert_frame_equal(results(cfg.run_dir / "eval"), single, check_exact=True)
    assert (cfg.run_dir / "report.html").is_file() and not (cfg.run_dir / JOURNAL).exists()
    # The per-item answers of the three shards' journals, gathered, are one process's.
    pd.testing.assert_frame_equal(answers(cfg.run_dir), answers(config(tmp_path / "one").run_dir), check_exact=True)


@pytest.mark.parametrize("interruption", ["scontrol requeue", "time-limit signal"])
def test_an_interrupted_training_job_ends_with_the_uninterrupted_adapter(tmp_path, interruption, one_thread):
    steps = ["train.steps=60", "train.checkpoint_every=5"]
    whole = train(config(tmp_path, *steps, "train.run_name=whole"))
    cfg = config(tmp_path, *steps, *SLURM, "train.run_name=interrupted")
    job = submit_training(cfg, tmp_path)
    wait_for_jobs(until=lambda: (cfg.run_dir / "checkpoints" / "step_5").is_dir())
    if interruption == "scontrol requeue":
        subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    else:  # what SLURM sends `cluster.signal_delay_s` before the time limit
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    wait_for_jobs()
    for key, value in adapter(whole).items():
        assert torch.equal(adapter(cfg.run_dir)[key], value), key
    logged = [json.loads(line)["step"] for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(60))
    log = Path(job.paths.stdout).read_text()
    assert log.count("Starting with JobEnvironment") == 2, "the job did not run a second time"
    if interruption == "time-limit signal":
        # The step in progress was finished and checkpointed before the job requeued itself.
        assert "stopped as asked after step" in log
        stopped = int(log.split("stopped as asked after step ")[1].split()[0])
        assert (cfg.run_dir / "checkpoints" / f"step_{stopped}").is_dir()


def test_a_cancelled_evaluation_shard_scores_only_its_missing_points_when_resubmitted(tmp_path, one_thread):
    # Slow enough points (30 adaptation steps each) for the cancellation to land half-way.
    slow = ["eval.max_test=8", "eval.adapt_steps=30"]
    cfg = config(tmp_path, *UNTRAINED, *SLURM, *slow)
    path = str(save_config(cfg, tmp_path / "configs" / "evaluation"))
    executor = make_executor(cfg.cluster, tmp_path / "jobs", single_process_shape(cfg.cluster, "eval", gpu=True))
    points = cfg.run_dir / JOURNAL / "points-0.jsonl"

    def lines() -> list[str]:
        return points.read_text().splitlines() if points.is_file() else []

    job = executor.submit(EvaluationShardJob(), path, 0, 1)
    wait_for_jobs(until=lambda: len(lines()) >= 5)
    subprocess.run(["scancel", job.job_id], check=True)
    wait_for_jobs()
    cut = len(lines())
    executor.submit(EvaluationShardJob(), path, 0, 1)
    wait_for_jobs()
    keys = [tuple(json.loads(line)[k] for k in ("method", "task", "n_shots", "seed")) for line in lines()]
    assert len(keys) == len(set(keys)) > cut, "a point was scored twice, or none after the resubmission"
    single = results(run_evaluation(config(tmp_path / "one", *UNTRAINED, *slow)))
    # Every row but lora's 0-shot ones (copies of the base model's, never scored) is a scored point.
    assert len(single) - int(((single["method"] == "lora") & (single["n_shots"] == 0)).sum()) == len(keys)
    pd.testing.assert_frame_equal(results(run_evaluation(cfg, score=False)), single, check_exact=True)
    # Each item once, as one process answered it, though the shard was cancelled half-way.
    one = config(tmp_path / "one", *UNTRAINED, *slow).run_dir
    pd.testing.assert_frame_equal(answers(cfg.run_dir), answers(one), check_exact=True)


def test_a_sweep_submitted_to_slurm_equals_the_sweep_run_in_one_process(tmp_path, one_thread):
    def sweep(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({
            "notebook": str(ROOT / "notebooks" / "02_few_shot_eval.ipynb"), "config_files": SMOKE,
            "overrides": ["eval.methods=[metalora]", "data.heldout_tasks=[add_9]", "eval.n_shots=[0,2]",
                          "eval.max_test=4", *SLURM],
            "grid": {"meta.n_support": [2, 4]}, "output_dir": str(tmp_path / name),
        }))  # fmt: skip
        return path

    here, _ = run_sweep(sweep("here"), executor="debug")
    there, submission = run_sweep(sweep("there"))
    assert [len(ids) for ids in submission.stages.values()] == [2, 1]
    wait_for_jobs()
    for table in ("results.csv", "summary.csv"):
        got, want = (pd.read_csv(root / table).drop(columns="adapt_seconds", errors="ignore") for root in (there, here))
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_a_two_process_training_job_equals_one_process(tmp_path):
    shape = ["meta.meta_batch_size=4", "train.steps=2"]
    one = train(config(tmp_path, *shape, "train.run_name=one", "train.cpu=true"))
    cfg = config(tmp_path, *shape, *SLURM, "train.run_name=two", "train.cpu=true", "cluster.processes_per_node=2")
    submit_training(cfg, tmp_path)
    wait_for_jobs()
    assert json.loads((cfg.run_dir / "summary.json").read_text())["processes"] == 2
    for key, value in adapter(one).items():
        assert_close_at_scale(adapter(cfg.run_dir)[key], value)


@pytest.mark.parametrize(
    "override, said",
    [("cluster.partition=nowhere", "invalid partition"), ("cluster.gpus_per_node=1", "gres"),
     ("cluster.cpus_per_task=4096", "node configuration is not available")],
)  # fmt: skip
def test_a_setting_slurm_refuses_is_named_before_anything_is_submitted(tmp_path, override, said):
    with pytest.raises(ConfigError, match=rf"SLURM refuses the train jobs' request \(.*\): .*{said}"):
        submit_plan(config(tmp_path, *SLURM, override))
    assert queue() == [] and not (tmp_path / "smoke").exists()
    with pytest.raises(ConfigError, match="cluster.time_min"):
        config(tmp_path, *SLURM, "cluster.time_min=0")
