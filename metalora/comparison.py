"""`metalora eval`: few-shot curves of every compared initialisation, with statistics and figures.

Writes into `<run_dir>/eval/`: results.csv (long form), summary.csv, significance.csv,
efficiency.csv, few_shot.png and efficiency.png. Trained methods are read from their run
directories (see `method_run_dir`); `train_missing=True` trains the ones that are not there yet.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from metalora.baselines import FULL_DATA_SHOTS
from metalora.checkpoint import load_full_weights
from metalora.config import TRAINED_METHODS, Config, save_config
from metalora.efficiency import efficiency_table
from metalora.episodes import Encoder
from metalora.errors import MetaloraError
from metalora.evaluation import AdaptSettings, EvalRow, adapter_init, evaluate_init, rows_as_dicts, snapshot_lora
from metalora.io import atomic_write_text
from metalora.lora import attach_lora
from metalora.models import load_model, pick_device
from metalora.plots import efficiency_figure, few_shot_figure
from metalora.splits import Experiment, build_experiment
from metalora.stats import significance, summarise


class EvaluationError(MetaloraError):
    """A compared method cannot be evaluated (missing run, leaking split, no held-out tasks)."""


def method_run_dir(cfg: Config, method: str) -> Path:
    """The run directory a trained method is read from.

    `eval.runs[method]` when given; else this config's own run directory for its `meta.algorithm`;
    else `<output_dir>/<run_name>-<method>`.
    """
    if method in cfg.eval.runs:
        return Path(cfg.eval.runs[method])
    if method == cfg.meta.algorithm:
        return cfg.run_dir
    return Path(cfg.train.output_dir) / f"{cfg.train.run_name}-{method}"


def config_for_method(cfg: Config, method: str) -> Config:
    """This config with `meta.algorithm` set to `method` and the run directory `method_run_dir` names."""
    derived = copy.deepcopy(cfg)
    run_dir = method_run_dir(cfg, method)
    derived.meta.algorithm = method
    derived.train.output_dir = str(run_dir.parent)
    derived.train.run_name = run_dir.name
    return derived


def ensure_trained(cfg: Config, methods: list[str], train_missing: bool) -> dict[str, Path]:
    """Run directories of the trained methods among `methods`, training missing ones when asked.

    Each missing run trains in a child process (`python -m metalora.train`), so its logged peak
    memory is its own and not that of whatever this process ran before.

    Raises:
        EvaluationError: a run is missing (or unfinished) and `train_missing` is False, or its
            training failed.
    """
    runs = {}
    for method in (m for m in methods if m in TRAINED_METHODS):
        run_dir = method_run_dir(cfg, method)
        if not (run_dir / "summary.json").is_file():
            if not train_missing:
                raise EvaluationError(
                    f"eval.methods has '{method}' but {run_dir} holds no finished run: train it with "
                    f"`metalora train <params> meta.algorithm={method} train.run_name={run_dir.name}`, "
                    f"point eval.runs.{method} at a run, or pass --train-missing"
                )
            _train_in_child(config_for_method(cfg, method), resume=(run_dir / "checkpoints").is_dir())
        runs[method] = run_dir
    return runs


def _train_in_child(cfg: Config, resume: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        params = save_config(cfg, tmp)
        command = [sys.executable, "-m", "metalora.train", str(params), *(["--resume"] if resume else [])]
        child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        errors = []
        for line in child.stderr:  # echoed as it comes (progress), errors kept for the exception
            sys.stderr.write(line)
            if "error:" in line:
                errors.append(line.strip())
        status = child.wait()
    if status != 0:
        reason = errors[-1] if errors else "see its output above"
        raise EvaluationError(
            f"training {cfg.meta.algorithm} into {cfg.run_dir} failed (exit status {status}): {reason}"
        )


def check_no_leak(experiment: Experiment, method: str, run_dir: Path) -> None:
    """Refuse a trained run that saw a held-out task or any held-out example during training.

    Raises:
        EvaluationError: naming the method, the run and the overlapping tasks or examples.
    """
    splits = json.loads((run_dir / "splits.json").read_text())
    seen_tasks = set(splits["train"]) & set(experiment.heldout)
    if seen_tasks:
        raise EvaluationError(f"{method} run {run_dir} meta-trained on held-out task(s) {sorted(seen_tasks)}")
    seen = {i for pools in splits["train"].values() for i in pools["support"] + pools["query"]}
    leaked = sorted(e.id for p in experiment.heldout.values() for e in p.adapt + p.test if e.id in seen)
    if leaked:
        raise EvaluationError(f"{method} run {run_dir} trained on held-out example(s) {leaked[:5]}")


def run_evaluation(cfg: Config, train_missing: bool = False) -> Path:
    """Evaluate every method of `cfg.eval.methods` few-shot on the held-out tasks and write the tables.

    Args:
        cfg: the config (data, LoRA, eval and baseline settings; the run directory receives eval/).
        train_missing: train methods whose run directory holds no finished run.

    Returns:
        The eval directory.

    Raises:
        EvaluationError: no held-out tasks, a missing run, or a run that saw held-out data.
    """
    experiment = build_experiment(cfg.data, cfg.train.seed)
    if not experiment.heldout:
        raise EvaluationError("no held-out tasks to evaluate on: set data.heldout_tasks (glob patterns)")
    runs = ensure_trained(cfg, list(cfg.eval.methods), train_missing)
    for method, run_dir in runs.items():
        check_no_leak(experiment, method, run_dir)
    out = cfg.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    rows = _evaluate_methods(cfg, experiment, runs)
    results = pd.DataFrame(rows_as_dicts(rows))
    _write_csv(results, out / "results.csv")
    summary = summarise(results)
    _write_csv(summary, out / "summary.csv")
    _write_csv(significance(results, reference=cfg.eval.reference), out / "significance.csv")
    few_shot_figure(summary, out / "few_shot.png")
    if runs:
        efficiency = efficiency_table(runs)
        _write_csv(efficiency, out / "efficiency.csv")
        efficiency_figure(efficiency, out / "efficiency.png")
    return out


def _evaluate_methods(cfg: Config, experiment: Experiment, runs: dict[str, Path]) -> list[EvalRow]:
    device = pick_device(cfg.train.cpu)
    model, tokenizer = load_model(cfg.model)
    model.to(device)
    encoder = Encoder(tokenizer, cfg.data.prompt_template, cfg.data.use_instruction,
                      cfg.data.max_prompt_tokens, cfg.data.max_target_tokens, device)  # fmt: skip
    settings = AdaptSettings(cfg.eval.adapt_steps, cfg.eval.adapt_lr, cfg.meta.inner_optimizer,
                             cfg.meta.inner_batch_size)  # fmt: skip

    def curve(net: torch.nn.Module, method: str, init: dict, shots: list[int], how: AdaptSettings) -> list[EvalRow]:
        return evaluate_init(net, method, init, experiment.heldout, encoder, shots, cfg.eval.seeds, how,
                             cfg.eval.max_test, cfg.eval.batch_size)  # fmt: skip

    methods = list(cfg.eval.methods)
    rows: list[EvalRow] = []
    if "fomaml" in methods:
        full_model, _ = load_model(cfg.model)
        load_full_weights(full_model, runs["fomaml"] / "model")
        full_model.to(device)
        full_model.eval()
        init = {k: v.detach() for k, v in full_model.named_parameters()}
        rows += curve(full_model, "fomaml", init, list(cfg.eval.n_shots), settings)
        del full_model, init
    # The fresh init of the `lora` and `full_data` methods: the one meta-training started from.
    peft_model = attach_lora(model, cfg.lora, seed=cfg.train.seed)
    fresh = snapshot_lora(peft_model)
    full_data = AdaptSettings(cfg.baseline.full_data_steps, cfg.baseline.full_data_lr, cfg.meta.inner_optimizer,
                              cfg.meta.inner_batch_size)  # fmt: skip
    for method in methods:
        if method == "base":  # the base model has nothing to adapt: its zero-shot score only
            rows += curve(peft_model, "base", fresh, [0], settings)
        elif method == "lora":
            rows += curve(peft_model, "lora", fresh, list(cfg.eval.n_shots), settings)
        elif method == "full_data":
            rows += curve(peft_model, "full_data", fresh, [FULL_DATA_SHOTS], full_data)
        elif method != "fomaml":
            init = adapter_init(peft_model, runs[method] / "adapter")
            rows += curve(peft_model, method, init, list(cfg.eval.n_shots), settings)
    return rows


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, frame.to_csv(index=False))
