"""The meta-step benchmark: its naive reference computes the same update, and its output schema."""

import json
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from numerics import assert_close_at_scale
from smoke import SMOKE

from metalora.benchmarks.meta_step import VARIANTS, markdown, naive_meta_step, variant_config
from metalora.benchmarks.meta_step import main as bench_main
from metalora.benchmarks.saved_activations import main as saved_activations_main
from metalora.benchmarks.saved_activations import saved_storages
from metalora.config import load_config
from metalora.machine import cpu_model_name
from metalora.modeling.lora import lora_params
from metalora.training.parts import build_parts
from metalora.training.step import training_step


@pytest.mark.numerics
@pytest.mark.parametrize("query_batch_size", [4, 1])
def test_the_naive_reference_takes_the_same_meta_step_as_the_kit(nudge_lora_b, query_batch_size):
    # One query batch, and one per example (the query loss then weighs batches by their target tokens).
    cfg = load_config(SMOKE, ["lora.dropout=0.0", "meta.inner_optimizer=adam", "meta.inner_steps=3",
                              f"meta.query_batch_size={query_batch_size}"])  # fmt: skip
    updated = []
    for naive in (False, True):
        torch.manual_seed(0)
        parts = build_parts(cfg)
        nudge_lora_b(parts)
        tasks = parts.tasks
        episodes = parts.sampler.sample(0)
        if naive:
            naive_meta_step(parts.model, episodes, tasks, parts.encoder, cfg, parts.optimizer)
        else:
            training_step(parts, 0, Accelerator(cpu=True))
        updated.append({k: v.detach().clone() for k, v in lora_params(parts.model).items()})
    for name in updated[0]:
        assert_close_at_scale(updated[0][name], updated[1][name])


def test_the_bench_child_imports_no_analysis_libraries():
    # A child's peak resident set is the variant's memory figure: libraries the meta-step never uses
    # (pandas and pyarrow came in through the efficiency report once, about 60 MB) would count in it.
    probe = (
        "import sys, metalora.benchmarks.meta_step; print(sorted({'pandas', 'pyarrow', 'seaborn'} & set(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def reject_non_json_constant(name: str) -> None:
    raise AssertionError(f"the record holds {name}, which is not JSON")


def test_markdown_marks_a_rate_that_was_not_counted():
    row = {"variant": "naive", "meta_batch_size": 2, "seconds_per_step": 2.0, "tokens_per_s": 50.0,
           "useful_flops_per_s": None, "peak_memory_mb": 100.0, "weights_bytes": 10}  # fmt: skip
    counted = {**row, "variant": "metalora", "useful_flops_per_s": 5e9}
    lines = markdown([row, counted], peak=1e10).splitlines()
    assert lines[2].split(" | ")[5:7] == ["n/a", "n/a"]
    assert lines[3].split(" | ")[5:7] == ["5.0", "50%"]


@pytest.mark.slow
def test_bench_writes_every_variant_and_the_memory_sweep(tmp_path, capsys):
    # Each variant runs in its own child process; the speed-option variants differ from `metalora` only in the
    # config `variant_config` gives them (tested below), so the end-to-end run takes the kit, the references and
    # the task-batched path the sweep needs.
    variants = ["metalora", "metalora-batched", "naive", "fomaml"]
    options = ["--steps", "1", "--warmup", "0", "--meta-batches", "1,2", "--output", str(tmp_path), "--profile",
               "--variants", ",".join(variants)]  # fmt: skip
    assert bench_main([*SMOKE, *options]) == 0
    record = json.loads((tmp_path / "meta_step.json").read_text(), parse_constant=reject_non_json_constant)
    rows = {r["variant"]: r for r in record["rows"]}
    assert rows["naive"]["flops_per_token"] is None  # only the kit's path and FOMAML count their FLOPs
    assert set(rows) == set(variants)
    assert record["matmul_peak_flops"] > 0
    assert record["machine"]["cpu"] == cpu_model_name() == rows["metalora"]["device"]
    for row in rows.values():
        assert row["seconds_per_step"] > 0 and row["peak_memory_mb"] > 0 and row["useful_flops_per_s"] > 0
    assert rows["fomaml"]["weights_bytes"] > 10 * rows["metalora"]["weights_bytes"]
    assert rows["fomaml"]["flops_per_token"] > rows["metalora"]["flops_per_token"]
    # Each compared variant was profiled (shares of one step's time), the sweep was not.
    for row in rows.values():
        shares = row["time_breakdown"]
        assert sum(shares.values()) == pytest.approx(1.0) and shares["matrix multiply"] > 0
        assert 0 < row["memory_after_setup_mb"] <= row["peak_memory_mb"]
        assert row["operator_calls"] > 0
    assert rows["metalora"]["model_parameter_bytes"] > rows["fomaml"]["model_parameter_bytes"]  # + the LoRA weights
    assert all(r["time_breakdown"] is None for r in record["meta_batch_sweep"])
    # The profiled step's matmuls, by what they multiply; FOMAML's step is profiled without shapes
    # (recording them holds every input tensor of its full-weight step until the profile ends).
    assert set(rows["metalora"]["matmul_rates"]) == {"base weights", "LoRA", "vocabulary projection"}
    assert set(rows["naive"]["matmul_rates"]) == {"base weights", "LoRA", "vocabulary projection"}
    assert rows["fomaml"]["matmul_rates"] is None
    for rate in rows["metalora"]["matmul_rates"].values():
        assert 0 < rate["time_share"] < 1 and rate["flops_per_s"] > 0
    sweep = [(r["variant"], r["meta_batch_size"]) for r in record["meta_batch_sweep"]]
    assert sweep == [("metalora", 1), ("metalora", 2), ("metalora-batched", 1), ("metalora-batched", 2)]
    out = capsys.readouterr().out
    assert f"machine: {cpu_model_name()} (" in out
    assert "| naive |" in out and "| random numbers |" in out and "| metalora | LoRA |" in out


def test_each_variant_sets_the_option_it_stands_for():
    cfg = load_config(SMOKE)
    configs = {variant: variant_config(cfg, variant) for variant in VARIANTS}
    assert configs["fomaml"].meta.algorithm == "fomaml"
    assert {v for v, c in configs.items() if c.speed.task_batched} == {"metalora-batched"}
    assert {v for v, c in configs.items() if c.speed.pack_tokens > 0} == {"metalora-packed"}
    assert {v for v, c in configs.items() if c.speed.compile_layers} == {"metalora-compiled"}
    assert {v for v, c in configs.items() if c.speed.activation_checkpointing} == {"metalora-checkpointed"}
    assert {v for v, c in configs.items() if not c.speed.weight_first_logits} == {"naive"}
    assert configs["naive"].speed.cpu_dropout_masks == "torch" and cfg.speed.task_batched is False


def test_profiled_time_is_split_into_matmul_attention_random_and_other():
    from metalora.benchmarks.meta_step import time_breakdown

    events = [("aten::mm", 5.0), ("aten::addmm", 1.0), ("aten::bernoulli_", 2.0),
              ("aten::_scaled_dot_product_flash_attention_for_cpu", 1.0), ("aten::mul", 1.0)]  # fmt: skip
    shares = time_breakdown(events)
    assert shares == pytest.approx({"matrix multiply": 0.6, "attention": 0.1, "random numbers": 0.2, "other": 0.1})
    with pytest.raises(ValueError, match="no operator time"):
        time_breakdown([("aten::mm", 0.0)])


def test_operator_calls_count_only_operators_not_called_by_another_operator():
    from types import SimpleNamespace

    from metalora.benchmarks.meta_step import operator_calls

    def event(name, parent=None):
        return SimpleNamespace(name=name, cpu_parent=parent)

    step = event("## meta step ##")
    linear = event("aten::linear", step)
    backward = event("autograd::engine::evaluate_function: MmBackward0")
    mm_node = event("MmBackward0", backward)
    events = [step, linear, event("aten::t", linear), event("aten::mm", event("labelled", linear)),
              event("aten::mul"), backward, mm_node, event("aten::mm", mm_node),
              event("metalora::numpy_dropout_mask")]  # fmt: skip
    # linear (its t and mm are inside it), mul, and the backward's mm under an autograd node.
    assert operator_calls(events) == 3


def test_repeats_combine_into_median_time_and_highest_memory():
    from metalora.benchmarks.meta_step import combine_repeats

    def run(seconds, rate, memory):
        return {"variant": "naive", "meta_batch_size": 2, "seconds_per_step": seconds, "tokens_per_s": rate,
                "peak_memory_mb": memory}  # fmt: skip

    runs = [run(9.0, 100.0, 10), {"variant": "naive", "meta_batch_size": 2, "error": ["killed"]},
            run(13.0, 70.0, 12), run(10.0, 90.0, 11)]  # fmt: skip
    row = combine_repeats(runs)
    assert (row["seconds_per_step"], row["tokens_per_s"], row["peak_memory_mb"]) == (10.0, 90.0, 12)
    assert row["seconds_per_step_runs"] == [9.0, 13.0, 10.0] and row["failed_repeats"] == 1
    assert "error" in combine_repeats(runs[1:2])


def test_the_cli_hands_leading_options_to_the_bench(monkeypatch):
    import metalora.benchmarks.meta_step as bench
    from metalora.cli import main

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) or 0)
    assert main(["bench", "--variants", "metalora,naive", "--repeats", "3", "params/smoke.yaml"]) == 0
    assert seen == [["--variants", "metalora,naive", "--repeats", "3", "params/smoke.yaml"]]


def test_an_unknown_variant_is_refused_by_name_before_anything_runs(capsys):
    for option in ("--variants", "--sweep-variants"):
        with pytest.raises(SystemExit):
            bench_main([*SMOKE, option, "metalora,metalora-compield"])
        assert f"{option}: unknown variant(s) metalora-compield" in capsys.readouterr().err


def test_matmul_operands_follow_each_operators_input_layout():
    from metalora.benchmarks.matmul_rates import matmul_flops, operands

    assert operands("aten::mm", [[96, 576], [576, 8]]) == ([96, 576], [576, 8])
    assert operands("aten::mm", [[96, 576], [576, 8], [96, 8]]) == ([96, 576], [576, 8])  # out= follows
    assert operands("aten::addmm", [[8], [96, 576], [576, 8], [], []]) == ([96, 576], [576, 8])  # addend, scalars
    assert operands("aten::baddbmm", [[3, 5, 2], [3, 5, 7], [3, 7, 2], [], []]) == ([3, 5, 7], [3, 7, 2])
    assert operands("aten::mm", [[], []]) is None  # traced while compiling: no shapes
    with pytest.raises(ValueError, match="aten::mul"):
        operands("aten::mul", [[2, 2], [2, 2]])
    assert matmul_flops([96, 576], [576, 8]) == 2 * 96 * 576 * 8
    assert matmul_flops([3, 5, 7], [3, 7, 2]) == 2 * 3 * 5 * 7 * 2


def test_matmul_rates_split_base_lora_and_vocabulary_matmuls():
    from metalora.benchmarks.matmul_rates import matmul_rates

    events = [
        ("aten::mm", [[96, 576], [576, 576]], 10, 6000.0),  # base: 10 calls, 6 ms
        ("aten::mm", [[96, 576], [576, 8]], 20, 2000.0),  # LoRA A (r = 8)
        ("aten::mm", [[8, 96], [96, 576]], 20, 1000.0),  # a LoRA gradient
        ("aten::mm", [[20, 576], [576, 1000]], 1, 500.0),  # the vocabulary head (V = 1000)
        ("aten::mul", [[96, 576], [96, 576]], 50, 500.0),  # not a matmul: only in the total
        ("aten::mm", [[], []], 3, 0.0),  # traced while compiling: left out
    ]
    rates = matmul_rates(events, total_time=10000.0, lora_rank=8, vocab_size=1000)
    assert list(rates) == ["base weights", "LoRA", "vocabulary projection"]
    assert rates["base weights"]["time_share"] == pytest.approx(0.6)
    assert rates["base weights"]["flops"] == pytest.approx(10 * 2 * 96 * 576 * 576)
    assert rates["base weights"]["flops_per_s"] == pytest.approx(10 * 2 * 96 * 576 * 576 / 6e-3)
    assert rates["LoRA"]["time_share"] == pytest.approx(0.3)
    assert rates["LoRA"]["flops"] == pytest.approx(40 * 2 * 96 * 576 * 8)
    assert rates["vocabulary projection"]["flops_per_s"] == pytest.approx(2 * 20 * 576 * 1000 / 5e-4)


def test_saved_storages_counts_each_kept_storage_once_and_leaves_parameters_out():
    x = torch.randn(100, requires_grad=True)
    weight = torch.randn(100)  # a product with x keeps weight (x's gradient needs it), not x

    def forward() -> torch.Tensor:
        return (x * weight).sum() + (x * weight).sum() + (x * weight[:50].repeat(2)).sum()

    kept = saved_storages(forward, leave_out=set())
    assert sorted(size for size, _ in kept.values()) == [400, 400]  # weight once, the repeated copy once
    assert sum(size for size, _ in saved_storages(forward, {weight.untyped_storage().data_ptr()}).values()) == 400


def test_saved_activations_script_reports_kit_and_reference_for_both_batches(capsys):
    assert saved_activations_main(["params/base.yaml", "params/smoke.yaml", "--top", "2"]) == 0
    rows = [
        line.split("|")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| support") or line.startswith("| query")
    ]
    assert len(rows) == 2
    for row in rows:
        kit_mb, reference_mb, ratio = float(row[3]), float(row[4]), float(row[5])
        assert kit_mb > 0 and reference_mb > 0
        assert ratio == pytest.approx(kit_mb / reference_mb, abs=0.02)


def test_gpu_check_without_cuda_runs_only_the_cpu_proxy_and_exits_zero(tmp_path, monkeypatch, capsys):
    from metalora.benchmarks import gpu_check

    ran = []
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)

    def fake_run(step):
        ran.append(step)
        return gpu_check.Outcome(step.name, "ok", 1.0, "")

    monkeypatch.setattr(gpu_check, "run_step", fake_run)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert [s.name for s in ran] == ["CPU proxy: operator calls per meta-step"]
    assert "--profile" in ran[0].command and "no CUDA device is visible" in capsys.readouterr().out
    record = json.loads(next(tmp_path.glob("gpu_check_*.json")).read_text())
    assert record["device"] == "cpu" and record["steps"][0]["status"] == "ok"
    steps = gpu_check.gpu_steps(tmp_path / "arch", tmp_path, tmp_path / "scratch")
    assert [s.name for s in steps][0] == "tests marked gpu" and sum(s.limit_s for s in steps) <= 8 * 60


def test_scoring_rate_times_batched_and_one_at_a_time_generation_of_the_same_examples(tmp_path, capsys):
    from metalora.benchmarks.scoring_rate import main as scoring_rate_main

    assert scoring_rate_main([*SMOKE, "eval.batch_size=4", "--output", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "scoring_rate.json").read_text())
    assert record["examples"] == 8 and record["batch_size"] == 4
    assert record["batched_examples_per_s"] > 0 and record["one_at_a_time_examples_per_s"] > 0
    assert record["batched_score"] == record["one_at_a_time_score"]
    assert "| one at a time |" in capsys.readouterr().out
