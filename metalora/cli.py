"""The `metalora` command line: `metalora <command> [params.yaml ...] [a.b=value ...]`."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys

from metalora.config import EXECUTORS, Config, load_config, split_args
from metalora.errors import exit_status


def config_from_args(items: list[str]) -> Config:
    """Load the config named by positional arguments (files then overrides)."""
    return load_config(*split_args(items))


def cmd_train(args: argparse.Namespace) -> int:
    """Run meta-training (the same entry point as `python -m metalora.training.train`)."""
    from metalora.training.train import main as train_main

    return train_main(args.args)


def cmd_info(args: argparse.Namespace) -> int:
    """Print package versions, the machine, and parameter counts for the configured model."""
    from metalora.machine import describe_machine
    from metalora.modeling.build import load_base
    from metalora.modeling.lora import attach_lora
    from metalora.modeling.models import count_parameters

    cfg = config_from_args(args.config)
    info: dict[str, object] = {
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("metalora", "torch", "transformers", "peft", "accelerate", "datasets")
        },
        "machine": describe_machine(),
        "model": cfg.model.name,
        "scenario": cfg.eval.scenario,
        "samples_per_task": cfg.data.samples_per_task,
        "training_seeds": cfg.train.seeds,
    }
    model, _ = load_base(cfg)
    info["base_parameters"] = count_parameters(model)["total"]
    peft_model = attach_lora(model, cfg.lora, cpu_dropout_masks=cfg.speed.cpu_dropout_masks)
    info["lora_parameters"] = count_parameters(peft_model)["trainable"]
    info["lora"] = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": cfg.lora.target_modules}
    print(json.dumps(info, indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the training runs and evaluation points an evaluation will need, and with --calibrate their wall time."""
    from metalora.experiments.plan import build_plan, calibrate, describe

    cfg = config_from_args(args.config)
    plan = build_plan(cfg)
    if args.calibrate:
        calibrate(cfg, plan)
    print(describe(plan))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Few-shot evaluation of the configured methods; writes <run_dir>/eval/."""
    from metalora.experiments.compare import run_evaluation

    out = run_evaluation(config_from_args(args.config), train_missing=args.train_missing)
    print(f"evaluation written to {out}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit what `metalora plan` lists: training runs, evaluation shards, then the tables and report."""
    from metalora.jobs.submit import parse_devices, submit_plan

    overrides = [f"cluster.executor={args.executor}"] if args.executor else []
    cfg = config_from_args([*args.config, *overrides])
    submission = submit_plan(cfg, parse_devices(args.devices))
    print(submission.describe(f"metalora plan {' '.join(args.config)}"))
    if cfg.cluster.executor != "slurm":
        print(f"evaluation written to {cfg.run_dir / 'eval'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run an ablation sweep's points as jobs (papermill inside each), then aggregate."""
    import pandas as pd

    from metalora.jobs.submit import parse_devices
    from metalora.jobs.sweep import run_sweep

    devices = parse_devices(args.devices)
    executor = args.executor or ("local" if devices else None)
    root, submission = run_sweep(args.sweep, kernel=args.kernel, executor=executor, devices=devices)
    print(submission.describe(f"ls {root}"))
    if submission.executor == "slurm":
        print(f"the sweep's aggregate tables will be written to {root} by its last job")
        return 0
    print(f"sweep written to {root}")
    points = pd.read_csv(root / "points.csv")
    failed = points[points["status"] != "ok"]
    if not failed.empty:
        print(f"metalora: error: {len(failed)} of {len(points)} sweep points failed: {', '.join(failed['point'])} "
              f"(their errors are in {root}/points.csv)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write report.md (and report.html) for a run or sweep directory."""
    from metalora.reporting.report import write_report

    print(f"report written to {write_report(args.directory, html=args.html)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's adapter with its model card, and push it to the Hub when asked."""
    from metalora.experiments.export import export_adapter, push_folder

    folder = export_adapter(args.run, args.out)
    print(f"adapter and model card written to {folder}")
    if args.push_to_hub:
        print(f"pushed to {push_folder(folder, args.push_to_hub, private=not args.public)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark the kit's meta-step against the naive reference and FOMAML."""
    from metalora.benchmarks.meta_step import main as bench_main

    return bench_main(args.args)


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """Convert a dataset into a task suite directory."""
    from metalora.data.prepare import PrepareOptions, prepare

    out = prepare(PrepareOptions.from_args(args))
    print(f"task suite written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="metalora", description="Meta-learning LoRA experiment kit.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, device, model and LoRA parameter counts")
    info.add_argument("config", nargs="*", help="YAML parameter files, then a.b=value overrides")
    info.set_defaults(func=cmd_info)
    train = commands.add_parser("train", help="meta-train (metalora, reptile or fomaml)", add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER, help="params files, a.b=value overrides, --resume")
    train.set_defaults(func=cmd_train)
    plan = commands.add_parser("plan", help="training steps, evaluation points and (--calibrate) wall time of a run")
    plan.add_argument("config", nargs="*", help="YAML parameter files, then a.b=value overrides")
    plan.add_argument("--calibrate", action="store_true", help="time a few steps and points on this machine")
    plan.set_defaults(func=cmd_plan)
    evaluate = commands.add_parser("eval", help="few-shot evaluation, baselines, statistics and figures")
    evaluate.add_argument("config", nargs="*", help="YAML parameter files, then a.b=value overrides")
    evaluate.add_argument("--train-missing", action="store_true", help="train methods that have no finished run")
    evaluate.set_defaults(func=cmd_eval)
    submit = commands.add_parser("submit", help="submit the plan's training runs, evaluation shards and report as jobs")
    submit.add_argument("config", nargs="*", help="YAML parameter files, then a.b=value overrides")
    submit.add_argument("--executor", choices=EXECUTORS, help="where the jobs run (default: cluster.executor)")
    submit.add_argument("--devices", default="", help="local executor: this machine's GPUs, e.g. 0,1,2,3, one job "
                        "per GPU at a time")  # fmt: skip
    submit.set_defaults(func=cmd_submit)
    sweep = commands.add_parser("sweep", help="run an ablation grid through papermill (params/ablations/*.yaml)")
    sweep.add_argument("sweep", help="the sweep file")
    sweep.add_argument("--kernel", default=None, help="Jupyter kernel for papermill (default: the notebook's)")
    sweep.add_argument("--executor", choices=EXECUTORS, help="where the points run (default: the cluster.executor "
                       "of the sweep's parameter files)")  # fmt: skip
    sweep.add_argument("--devices", default="", help="GPUs to spread the points over, e.g. 0,1,2,3: one point per GPU "
                       "at a time (local executor), each in its own process, logs under the sweep's jobs/")  # fmt: skip
    sweep.set_defaults(func=cmd_sweep)
    report = commands.add_parser("report", help="Markdown/HTML report of a run or sweep directory")
    report.add_argument("directory", help="a run directory or a sweep directory")
    report.add_argument("--html", action="store_true", help="also write report.html")
    report.set_defaults(func=cmd_report)
    export = commands.add_parser("export", help="a run's adapter as a folder plain peft loads, with a Hub model card")
    export.add_argument("run", help="a finished run directory (a LoRA method: metalora, reptile, multitask)")
    export.add_argument("out", help="the folder to write (replaced whole)")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the folder to this Hub model repository "
                        "(created when missing; needs `hf auth login` or HF_TOKEN)")  # fmt: skip
    export.add_argument("--public", action="store_true", help="create the Hub repository public (default private)")
    export.set_defaults(func=cmd_export)
    bench = commands.add_parser("bench", help="meta-step benchmark: metalora vs naive reference vs fomaml",
                                add_help=False)  # fmt: skip
    bench.add_argument("args", nargs=argparse.REMAINDER, help="params files, overrides, --steps, --meta-batches")
    bench.set_defaults(func=cmd_bench)
    from metalora.data.prepare import add_arguments

    prepare = commands.add_parser("prepare-data", help="turn a dataset (hub or local files) into a task suite")
    add_arguments(prepare)
    prepare.set_defaults(func=cmd_prepare_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments (default: sys.argv[1:]).

    Returns:
        The process exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = {"train": cmd_train, "bench": cmd_bench}
    if argv and argv[0] in passthrough:
        # Their own parsers take every argument: argparse's REMAINDER would drop a leading option.
        args = argparse.Namespace(func=passthrough[argv[0]], args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    return exit_status("metalora", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
