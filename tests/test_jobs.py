"""Jobs through submitit on this machine (the local and debug executors): what a submitted plan writes equals one
process's evaluation, shards share the points, a training stopped between two steps resumes to the same adapter.
The same against a real SLURM: tests/test_cluster.py (`make test-cluster`)."""

import os
import signal

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from smoke import SMOKE

from metalora.config import ConfigError, load_config
from metalora.experiments.compare import run_evaluation
from metalora.experiments.journal import JOURNAL, journaled_points
from metalora.experiments.runs import EvaluationError
from metalora.jobs.submit import submit_plan
from metalora.jobs.work import set_aside_unresumable, stop_requested_by_signal, use_allocated_cpus
from metalora.training.checkpoints import latest_checkpoint
from metalora.training.train import TrainingStopped, train

UNTRAINED = ["eval.methods=[base,lora]", "eval.seeds=2"]
# Everything but the wall time of each adaptation is a pure function of the config.
MEASURED = "adapt_seconds"


def config(tmp_path, *overrides):
    return load_config(SMOKE, [f"train.output_dir={tmp_path}", *overrides])


def results(eval_dir):
    return pd.read_csv(eval_dir / "results.csv").drop(columns=MEASURED)


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_a_plan_on_the_local_executor_writes_the_tables_of_one_process(tmp_path, one_thread):
    single = results(run_evaluation(config(tmp_path / "one"), train_missing=True))
    cfg = config(tmp_path / "jobs", "cluster.executor=local", "cluster.eval_shards=3")
    submission = submit_plan(cfg)
    # Two training runs (metalora, multitask) as two jobs on the two CPU slots, three shards, the report.
    assert [len(ids) for ids in submission.stages.values()] == [2, 2, 1]
    pd.testing.assert_frame_equal(results(cfg.run_dir / "eval"), single, check_exact=True)
    assert (cfg.run_dir / "report.md").is_file() and not (cfg.run_dir / JOURNAL).exists()
    for name in ("smoke", "smoke-multitask"):
        for key, value in adapter(tmp_path / "one" / name).items():
            assert torch.equal(adapter(tmp_path / "jobs" / name)[key], value), (name, key)
    # Submitted again, nothing is left to train: the training stage has no job.
    assert submit_plan(cfg).stages["training"] == []


def test_a_plan_on_the_debug_executor_runs_in_this_process(tmp_path):
    single = results(run_evaluation(config(tmp_path / "one", *UNTRAINED)))
    cfg = config(tmp_path / "debug", *UNTRAINED, "cluster.executor=debug", "cluster.eval_shards=2")
    submit_plan(cfg)
    pd.testing.assert_frame_equal(results(cfg.run_dir / "eval"), single)


def test_shards_score_disjoint_points_and_the_tables_wait_for_all_of_them(tmp_path):
    cfg = config(tmp_path, *UNTRAINED)
    run_evaluation(cfg, shard=(0, 2))
    first = journaled_points(cfg.run_dir)
    with pytest.raises(EvaluationError, match=r"holds \d+ of the evaluation's \d+ points; missing \(setting method"):
        run_evaluation(cfg, score=False)
    assert not (cfg.run_dir / "eval").exists()
    run_evaluation(cfg, shard=(1, 2))
    second = journaled_points(cfg.run_dir) - first
    assert first and second and not first & second
    # Another cluster setting is the same evaluation: the journal's points stand.
    out = run_evaluation(config(tmp_path, *UNTRAINED, "cluster.partition=other"), score=False)
    single = results(run_evaluation(config(tmp_path / "one", *UNTRAINED)))
    pd.testing.assert_frame_equal(results(out), single)


def test_training_stopped_between_steps_checkpoints_and_resumes_to_the_uninterrupted_adapter(tmp_path):
    whole = train(config(tmp_path, "train.run_name=whole", "train.steps=4", "train.checkpoint_every=0"))
    cfg = config(tmp_path, "train.run_name=stopped", "train.steps=4", "train.checkpoint_every=0")
    asked = iter([False, True])
    with pytest.raises(TrainingStopped, match="stopped as asked after step 2 of 4"):
        train(cfg, stop=lambda: next(asked))
    assert latest_checkpoint(cfg.run_dir).name == "step_2"
    train(cfg, resume=True)
    for key, value in adapter(whole).items():
        assert torch.equal(adapter(cfg.run_dir)[key], value), key


def test_a_run_without_a_checkpoint_is_set_aside_whole_and_a_resumable_one_stays(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    aside = set_aside_unresumable(run)
    assert aside is not None and (aside / "config.yaml").read_text() == "model: {}\n" and not run.exists()
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "config.yaml").write_text("")
    assert set_aside_unresumable(run) is None and (run / "config.yaml").is_file()


def test_the_time_limit_signal_raises_a_flag_inside_and_the_previous_handler_comes_back(monkeypatch):
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda *_: calls.append("previous"))
    try:
        with stop_requested_by_signal() as stop:
            assert not stop()
            signal.raise_signal(signal.SIGUSR2)
            assert stop() and calls == []
        signal.raise_signal(signal.SIGUSR2)
        assert calls == ["previous"]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_torch_threads_follow_the_cpus_slurm_gives_the_job(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    try:
        use_allocated_cpus(cpus_per_task=2)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")
        use_allocated_cpus(cpus_per_task=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "override, named",
    [("cluster.time_min=0", "cluster.time_min"), ("cluster.executor=kubernetes", "cluster.executor"),
     ("cluster.eval_shards=0", "cluster.eval_shards"), ("cluster.signal_delay_s=99999", "cluster.signal_delay_s"),
     ("cluster.partiton=gpu", "cluster.partition")],
)  # fmt: skip
def test_a_bad_cluster_setting_is_refused_when_the_config_loads(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(SMOKE, [override])


def test_a_cluster_setting_changes_no_resume(tmp_path):
    cfg = config(tmp_path, "train.steps=2", "train.checkpoint_every=1")
    with pytest.raises(TrainingStopped):
        train(cfg, stop=lambda: True)
    train(config(tmp_path, "train.steps=2", "train.checkpoint_every=1", "cluster.partition=gpu", "cluster.time_min=5"),
          resume=True)
    assert not (cfg.run_dir / "resumes.jsonl").exists()
