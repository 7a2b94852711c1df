"""`metalora bench`: the kit's meta-step side by side with a naive reference and FOMAML.

    metalora bench [params.yaml ...] [a.b=value ...] [--steps 5] [--warmup 1] [--repeats 1] [--meta-batches 1,2,4,8]

Variants, on the same episodes (the same seed and steps) and the same model:
- metalora: the kit's functional meta-step (`metalora.training.step.training_step`);
- metalora-batched: the same with `speed.task_batched` (all tasks of a meta-batch adapted in one
  vmapped forward pass and one backward);
- metalora-packed: the kit's meta-step with short batches packed into one unpadded row
  (`speed.pack_tokens`, 256 unless the config sets it);
- metalora-compiled: the kit's meta-step with every decoder layer compiled (`speed.compile_layers`;
  the compile happens in the warm-up steps, so give it `--warmup 2` or more);
- metalora-checkpointed: the kit's meta-step with activation checkpointing of every decoder layer
  (`speed.activation_checkpointing`: less activation memory, one more forward pass per backward);
- naive: the way the method is often first written, kept here as the reference: a deep copy of
  the PEFT model per task, a fresh AdamW per task, full-vocabulary logits over every position
  (the model's own `labels` loss), then the stage-2 gradient per task; peft's own LoRA dropout
  (torch's CPU masks, whatever `speed.cpu_dropout_masks` says for the kit) and nn.Linear's vocabulary
  projection (whatever `speed.weight_first_logits` says);
- fomaml: the kit's first-order meta-step over every base weight.
Each variant runs in its own child process, so its peak memory (CUDA max allocated, or the peak
resident set size on CPU) is its own. Useful FLOPs are counted with torch's FlopCounterMode on the
kit's path (metalora, or fomaml for itself) for one step and scaled by tokens; the naive reference
does the same useful work as metalora, plus waste. The matmul peak is measured in a child too.
`--profile` adds one more step per compared variant under torch.profiler and reports where its time
goes (matrix multiplies, attention, random numbers for dropout, everything else), how many operator
calls it makes (`operator_calls`) and, except for fomaml (whose step is too large to profile with
shapes), the rate of its matmuls by kind.
Results: a Markdown table on stdout and outputs/bench/meta_step.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from metalora.benchmarks.matmul_rates import matmul_rates
from metalora.config import Config, load_config, save_config, split_args
from metalora.data.collation import Encoder
from metalora.data.episodes import Episode
from metalora.data.tasks import Task
from metalora.io import atomic_write_json, atomic_write_text
from metalora.machine import cpu_model_name, describe_machine, machine_line
from metalora.method.loss import count_input_tokens, count_target_tokens
from metalora.modeling.lora import lora_params, save_adapter
from metalora.modeling.models import pick_device
from metalora.speed.dropout_masks import PROFILE_LABEL
from metalora.training.checkpoints import directory_bytes
from metalora.training.parts import build_parts
from metalora.training.step import training_step

RESULT_TAG = "BENCH-RESULT "
VARIANTS = (
    "metalora",
    "metalora-batched",
    "metalora-packed",
    "metalora-compiled",
    "metalora-checkpointed",
    "naive",
    "fomaml",
)
# The packed variant's token bound when the config leaves packing off: a few short rows per batch.
PACKED_VARIANT_TOKENS = 256


def naive_meta_step(
    peft_model: torch.nn.Module,
    episodes: list[Episode],
    tasks: dict[str, Task],
    encoder: Encoder,
    cfg: Config,
    meta_optimizer: torch.optim.Optimizer,
) -> None:
    """The naive reference: per-task deep copy and AdamW, full logits, first-order meta-gradient."""
    shared = lora_params(peft_model)
    grads = {name: torch.zeros_like(t) for name, t in shared.items()}
    for episode in episodes:
        task = tasks[episode.task]
        learner = copy.deepcopy(peft_model)
        trainable = [p for p in learner.parameters() if p.requires_grad]
        # No weight decay: the same update rule as the kit's functional Adam, only written naively.
        inner_optimizer = torch.optim.AdamW(trainable, lr=cfg.meta.inner_lr, weight_decay=0.0)
        support = encoder.batches(task, episode.support, cfg.meta.inner_batch_size)
        for step in range(cfg.meta.inner_steps):
            batch = support[step % len(support)]
            inner_optimizer.zero_grad()
            learner(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss.backward()
            inner_optimizer.step()
        inner_optimizer.zero_grad()
        query = encoder.batches(task, episode.query, cfg.meta.query_batch_size)
        # The query loss is the mean over all the query set's target tokens, as the kit's is.
        total_tokens = sum(count_target_tokens(b) for b in query)
        for batch in query:
            out = learner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            (out.loss * count_target_tokens(batch) / total_tokens).backward()
        for name, parameter in learner.named_parameters():
            if parameter.requires_grad:
                grads[name] += parameter.grad / len(episodes)
        del learner, inner_optimizer
    for name, tensor in shared.items():
        tensor.grad = grads[name]
    meta_optimizer.step()
    meta_optimizer.zero_grad(set_to_none=True)


def step_positions(episodes: list[Episode], tasks: dict[str, Task], encoder: Encoder, cfg: Config) -> tuple[int, int]:
    """Real tokens an algorithm must forward per meta-step (its inner steps and its query batches), and
    the positions the kit computes for them with padded batches (query batches grouped by length).

    Args:
        cfg: the run's configuration (batch sizes, inner steps).

    Returns:
        (real tokens, computed positions).
    """
    real = positions = 0
    for episode in episodes:
        task = tasks[episode.task]
        support = encoder.batches(task, episode.support, cfg.meta.inner_batch_size)
        query = encoder.batches(task, episode.query, cfg.meta.query_batch_size, group_by_length=True)
        for batch in [support[i % len(support)] for i in range(cfg.meta.inner_steps)] + query:
            real += count_input_tokens(batch)
            positions += batch["input_ids"].numel()
    return real, positions


def _current_memory_mb(device: torch.device) -> float:
    """Memory held now: CUDA allocated, or the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


OP_CATEGORIES = (
    ("matrix multiply", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    (
        "random numbers",
        ("aten::bernoulli", "aten::rand", "aten::uniform", "aten::normal", "aten::native_dropout", PROFILE_LABEL),
    ),
)
CATEGORIES = [category for category, _ in OP_CATEGORIES] + ["other"]


def op_category(name: str) -> str:
    """The category of a profiled operator name (see OP_CATEGORIES); the rest is 'other'."""
    for category, markers in OP_CATEGORIES:
        if any(marker in name for marker in markers):
            return category
    return "other"


def time_breakdown(events: list[tuple[str, float]]) -> dict[str, float]:
    """Share of the total self time per category.

    Args:
        events: (operator name, self time) pairs, e.g. from a profiler's key averages.

    Returns:
        {category: share} over CATEGORIES, summing to 1.
    """
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for name, self_time in events:
        totals[op_category(name)] += self_time
    whole = sum(totals.values())
    if whole <= 0:
        raise ValueError("the profile recorded no operator time")
    return {category: value / whole for category, value in totals.items()}


def operator_calls(events: Iterable) -> int:
    """How many aten operators the profiled code called itself, not from inside another aten operator.

    The operators an operator calls are its implementation, so they are not counted. Each counted call
    costs the framework's per-call overhead and, on a GPU, up to a few kernel launches: the figure to
    cut when a step of small tensors is bound by calls rather than arithmetic.

    Args:
        events: profiler events with `name` and `cpu_parent` (`torch.profiler.profile().events()`).

    Returns:
        The number of top-level aten operator calls.
    """
    calls = 0
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        calls += parent is None
    return calls


def _profile_step(
    one_step, step: int, device: torch.device, lora_rank: int, vocab_size: int, shapes: bool = True
) -> tuple[dict[str, float], dict[str, dict[str, float]] | None, int]:
    """Run one step under torch.profiler: its self time (device time on CUDA) by category, its
    matmuls' time share and FLOP rate by kind (`matmul_rates`; None when `shapes` is off), and its
    top-level operator calls (`operator_calls`)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=shapes) as prof:
        one_step(step)
    calls = operator_calls(prof.events())
    groups = prof.key_averages(group_by_input_shape=True)
    cuda = device.type == "cuda"
    own = [e.self_device_time_total if cuda else e.self_cpu_time_total for e in groups]
    # A matmul operator's device time is its kernels' (they are its children, not its self time).
    matmul_time = [e.device_time_total if cuda else e.self_cpu_time_total for e in groups]
    breakdown = time_breakdown([(e.key, t) for e, t in zip(groups, own, strict=True)])
    if not shapes:
        return breakdown, None, calls
    shaped = [(e.key, e.input_shapes, e.count, t) for e, t in zip(groups, matmul_time, strict=True)]
    return breakdown, matmul_rates(shaped, sum(own), lora_rank, vocab_size), calls


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def variant_config(cfg: Config, variant: str) -> Config:
    """A copy of `cfg` set up for one benchmark variant (the speed option or algorithm it stands for)."""
    cfg = copy.deepcopy(cfg)
    cfg.meta.algorithm = "fomaml" if variant == "fomaml" else "metalora"
    cfg.speed.task_batched = variant == "metalora-batched"
    if variant == "metalora-packed":
        cfg.speed.pack_tokens = cfg.speed.pack_tokens or PACKED_VARIANT_TOKENS
    if variant == "metalora-compiled":
        cfg.speed.compile_layers = True
    if variant == "metalora-checkpointed":
        cfg.speed.activation_checkpointing = True
    if variant == "naive":
        # The reference is transformers and peft as shipped: nn.Dropout and nn.Linear's vocabulary projection.
        cfg.speed.cpu_dropout_masks = "torch"
        cfg.speed.weight_first_logits = False
    return cfg


def run_variant(
    variant: str, cfg: Config, steps: int, warmup: int, bf16: bool, profile_time: bool = False
) -> dict[str, object]:
    """Time one variant in this process (call it in a fresh child for honest peak memory).

    Args:
        variant: metalora, metalora-batched, metalora-packed, metalora-compiled, metalora-checkpointed,
            naive or fomaml.
        bf16: bf16 autocast.
        profile_time: run one more step under torch.profiler and report its time by category.

    Returns:
        seconds per step (median), tokens/s, counted FLOPs per token, peak memory, memory after set-up,
        the model's parameter bytes, weights bytes on disk (and the time breakdown when profiled).
    """
    device = pick_device(cfg.train.cpu)
    cfg = variant_config(cfg, variant)
    torch.manual_seed(cfg.train.seed)
    parts = build_parts(cfg, device)
    tasks = parts.tasks
    # One process; its autocast is off, so the `autocast` below decides the precision for every variant alike.
    accelerator = Accelerator(cpu=device.type != "cuda", mixed_precision="no")
    # Before any step: on CPU the base weights are memory-mapped and become resident as the first step reads them.
    setup_memory = _current_memory_mb(device)
    parameter_bytes = sum(p.numel() * p.element_size() for p in parts.model.parameters())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def one_step(step: int) -> None:
        with autocast:
            if variant == "naive":
                naive_meta_step(parts.model, parts.sampler.sample(step), tasks, parts.encoder, cfg,
                                parts.optimizer)  # fmt: skip
            else:
                training_step(parts, step, accelerator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds, tokens = [], []
    for step in range(warmup + steps):
        began = time.perf_counter()
        one_step(step)
        if step >= warmup:
            seconds.append(time.perf_counter() - began)
            tokens.append(step_positions(parts.sampler.sample(step), tasks, parts.encoder, cfg)[0])
    peak = _peak_memory_mb(device)
    flops_per_token = None  # null in the record: JSON has no NaN
    if variant in ("metalora", "fomaml"):  # the kit's own per-task path defines the useful work
        counter = FlopCounterMode(display=False)
        extra = warmup + steps
        with counter:
            one_step(extra)
        real_tokens, _ = step_positions(parts.sampler.sample(extra), tasks, parts.encoder, cfg)
        flops_per_token = counter.get_total_flops() / real_tokens
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "fomaml":
            parts.model.save_pretrained(Path(tmp) / "model")
        else:
            save_adapter(parts.model, Path(tmp) / "adapter")
        weights_bytes = directory_bytes(Path(tmp))
    breakdown, rates, calls = None, None, None
    if profile_time:
        vocab = parts.model.get_output_embeddings().weight.shape[0]
        # Recording shapes keeps every operator's input tensors alive until the profile ends
        # (pytorch/pytorch#133444); FOMAML's full-weight inner loop then held over 24 GiB of CPU memory
        # on the embedded model, so its step is profiled without shapes and without matmul rates.
        breakdown, rates, calls = _profile_step(one_step, warmup + steps + 1, device, cfg.lora.r, vocab,
                                                shapes=variant != "fomaml")  # fmt: skip
    return {
        "variant": variant, "meta_batch_size": cfg.meta.meta_batch_size, "seconds_per_step": statistics.median(seconds),
        "tokens_per_s": sum(tokens) / sum(seconds), "flops_per_token": flops_per_token, "peak_memory_mb": peak,
        "memory_measure": "cuda_max_allocated" if device.type == "cuda" else "peak_rss", "weights_bytes": weights_bytes,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name(),
        "steps": steps, "warmup": warmup, "bf16": bf16, "memory_after_setup_mb": setup_memory,
        "model_parameter_bytes": parameter_bytes, "time_breakdown": breakdown, "matmul_rates": rates,
        "operator_calls": calls,
    }  # fmt: skip


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Best observed FLOP/s of a square matmul on `device` (the machine's practical peak)."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        began = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - began))
    return best


def _child(args: argparse.Namespace, cfg: Config) -> None:
    if args.child == "matmul":
        device = pick_device(cfg.train.cpu)
        # The machine is described by a child too, so the parent never touches the accelerator.
        result: dict[str, object] = {
            "matmul_flops": matmul_peak(device, torch.bfloat16 if args.bf16 else torch.float32),
            "machine": describe_machine(),
        }
    else:
        result = run_variant(args.child, cfg, args.steps, args.warmup, args.bf16, args.profile)
    print(RESULT_TAG + json.dumps(result), flush=True)


def _spawn(
    params: Path, child: str, meta_batch: int, args: argparse.Namespace, profile_time: bool = False
) -> dict[str, object]:
    command = [sys.executable, "-m", "metalora.benchmarks.meta_step", str(params), f"meta.meta_batch_size={meta_batch}",
               "--child", child, "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    if args.bf16:
        command.append("--bf16")
    if profile_time:
        command.append("--profile")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            # Each row is printed as it finishes, so a run cut short still leaves what it measured.
            print(line, flush=True)
            return json.loads(line[len(RESULT_TAG) :])
    # The traceback's last lines: enough to see where a child failed without its whole log.
    return {"variant": child, "meta_batch_size": meta_batch, "error": done.stderr.strip().splitlines()[-12:]}


def combine_repeats(runs: list[dict]) -> dict:
    """Merge one variant's repeated children: median time and rate, highest peak memory, every time kept.

    Args:
        runs: the rows of the same variant and meta-batch, one per repeat.

    Returns:
        One row (the last failure's row when every repeat failed).
    """
    finished = [r for r in runs if "error" not in r]
    if not finished:
        return runs[-1]
    row = dict(finished[0])
    row["seconds_per_step"] = statistics.median(r["seconds_per_step"] for r in finished)
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in finished)
    row["peak_memory_mb"] = max(r["peak_memory_mb"] for r in finished)
    row["seconds_per_step_runs"] = [r["seconds_per_step"] for r in finished]
    row["failed_repeats"] = len(runs) - len(finished)
    return row


def markdown(rows: list[dict], peak: float) -> str:
    """The results as a Markdown table (FLOP share against the measured matmul peak)."""
    lines = ["| variant | meta-batch | s/step (median) | s/step range over repeats | tokens/s | useful GFLOP/s | "
             "share of matmul peak | peak memory (MB) | weights on disk (bytes) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['meta_batch_size']} | failed: {r['error'][-1]} | | | | | | |")
            continue
        rate = r["useful_flops_per_s"]
        times = r.get("seconds_per_step_runs", [r["seconds_per_step"]])
        rates = ["n/a", "n/a"] if rate is None else [f"{rate / 1e9:.1f}", f"{rate / peak:.0%}"]
        cells = [
            r["variant"], r["meta_batch_size"], f"{r['seconds_per_step']:.2f}",
            f"{min(times):.2f}-{max(times):.2f} ({len(times)} runs)", f"{r['tokens_per_s']:.0f}",
            *rates, f"{r['peak_memory_mb']:.0f}", f"{r['weights_bytes']:,}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + f"\n\nmatmul peak measured: {peak / 1e9:.1f} GFLOP/s\n"


def breakdown_markdown(rows: list[dict]) -> str:
    """The profiled rows' time shares by category, and the memory held before their first step, as a table."""
    lines = ["| variant | " + " | ".join(CATEGORIES)
             + " | operator calls | memory after set-up (MB) | parameters (MB) |",
             "|---|" + "---|" * (len(CATEGORIES) + 3)]  # fmt: skip
    for r in rows:
        if r.get("time_breakdown"):
            shares = [f"{r['time_breakdown'][c]:.0%}" for c in CATEGORIES]
            sizes = [f"{r.get('operator_calls') or 0:,}", f"{r['memory_after_setup_mb']:.0f}",
                     f"{r['model_parameter_bytes'] / 2**20:.1f}"]  # fmt: skip
            lines.append(f"| {r['variant']} | " + " | ".join(shares + sizes) + " |")
    return "\n".join(lines) + "\n"


def matmul_rates_markdown(rows: list[dict], peak: float) -> str:
    """The profiled rows' matmul time shares and FLOP rates by kind, against the measured peak, as a table."""
    lines = ["| variant | matmuls of | share of the step's time | GFLOP in the step | GFLOP/s | share of matmul peak |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for kind, rate in (r.get("matmul_rates") or {}).items():
            cells = [r["variant"], kind, f"{rate['time_share']:.0%}", f"{rate['flops'] / 1e9:.1f}",
                     f"{rate['flops_per_s'] / 1e9:.1f}", f"{rate['flops_per_s'] / peak:.0%}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --child, one variant of it); returns the exit status."""
    parser = argparse.ArgumentParser(prog="metalora bench", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="*", help="YAML files then a.b=value overrides (default: base + demo)")
    parser.add_argument("--steps", type=int, default=5, help="timed meta-steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta-steps first")
    parser.add_argument("--meta-batches", default="1,2,4,8", help="meta-batch sizes of the memory sweep ('' skips it)")
    parser.add_argument("--variants", default="metalora,metalora-batched,naive,fomaml", help="variants to compare")
    parser.add_argument("--sweep-variants", default="metalora,metalora-batched", help="variants of the memory sweep")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="children per compared variant, run round-robin so drift hits every variant alike",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--profile", action="store_true", help="report where each compared variant's step spends time")
    parser.add_argument("--output", default="outputs/bench", help="where meta_step.json and .md go")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option, names in (("--variants", args.variants), ("--sweep-variants", args.sweep_variants)):
        unknown = [name for name in names.split(",") if name and name not in VARIANTS]
        if unknown:
            parser.error(f"{option}: unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    files, overrides = split_args(args.config)
    # The reference computes no diagnostics, so the kit's step skips its adaptation-gap forward too
    # (`meta.measure_gap=true` on the command line puts it back).
    cfg = load_config(files or ["params/base.yaml", "params/demo.yaml"], ["meta.measure_gap=false", *overrides])
    if args.child:
        _child(args, cfg)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        params = save_config(cfg, tmp)
        measured = _spawn(params, "matmul", cfg.meta.meta_batch_size, args)
        peak, machine = float(measured["matmul_flops"]), measured["machine"]
        variants = args.variants.split(",")
        # Profiled in the first repeat only: the profiled step is extra and untimed.
        runs = [[_spawn(params, v, cfg.meta.meta_batch_size, args, args.profile and repeat == 0) for v in variants]
                for repeat in range(args.repeats)]  # fmt: skip
        rows = [combine_repeats([repeat[i] for repeat in runs]) for i in range(len(variants))]
        sweep = [_spawn(params, v, int(m), args) for v in args.sweep_variants.split(",")
                 for m in args.meta_batches.split(",") if m]  # fmt: skip
    finished = [r for r in rows + sweep if "error" not in r]
    useful = {r["meta_batch_size"]: r["flops_per_token"] for r in finished if r["variant"] == "metalora"}
    for r in finished:
        # The naive reference and the task-batched step do the kit's useful work on the same episodes
        # (None, null in the record, if the kit's per-task variant failed).
        per_token = r["flops_per_token"] if r["variant"] == "fomaml" else useful.get(r["meta_batch_size"])
        r["useful_flops_per_s"] = None if per_token is None else per_token * r["tokens_per_s"]
    for r in rows + sweep:
        if "error" in r:
            failure = "\n".join(r["error"])
            print(f"{r['variant']} (meta-batch {r['meta_batch_size']}) failed:\n{failure}", file=sys.stderr)
    table = f"machine: {machine_line(machine)}\n\n" + markdown(rows, peak)
    if sweep:
        table += f"\nMemory sweep:\n\n{markdown(sweep, peak)}"
    if args.profile:
        table += f"\nWhere one profiled step's time goes (self time):\n\n{breakdown_markdown(rows)}"
        if any(r.get("matmul_rates") for r in rows):
            table += f"\nIts matrix multiplies by what they multiply:\n\n{matmul_rates_markdown(rows, peak)}"
    print(table)
    out = Path(args.output)
    record = {"rows": rows, "meta_batch_sweep": sweep, "matmul_peak_flops": peak, "repeats": args.repeats,
              "machine": machine}  # fmt: skip
    atomic_write_json(out / "meta_step.json", record)
    atomic_write_text(out / "meta_step.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
