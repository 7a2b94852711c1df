"""The submitit executor the `cluster` group asks for, and SLURM's own verdict on the request before any job is
submitted."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from metalora.config import ClusterConfig, ConfigError


@dataclass
class JobShape:
    """What one job asks for: nodes, processes per node, GPUs per node, and the jobs it waits for (SLURM only)."""

    name: str
    nodes: int = 1
    processes_per_node: int = 1
    gpus_per_node: int = 0
    after: tuple[str, ...] = ()


def training_shape(cluster: ClusterConfig) -> JobShape:
    """A training run's job: every node and process the cluster group asks for (one process per GPU by default)."""
    processes = cluster.processes_per_node or max(cluster.gpus_per_node, 1)
    return JobShape("train", cluster.nodes, processes, cluster.gpus_per_node)


def single_process_shape(cluster: ClusterConfig, name: str, gpu: bool) -> JobShape:
    """An evaluation shard, a sweep point or the report: one process on one node, with one GPU when `gpu` and the
    cluster group gives GPUs."""
    return JobShape(name, 1, 1, min(cluster.gpus_per_node, 1) if gpu else 0)


def make_executor(
    cluster: ClusterConfig, folder: Path, shape: JobShape, visible_gpus: tuple[int, ...] = ()
) -> submitit.Executor:
    """An executor of `cluster.executor` whose jobs have `shape` and the cluster group's resources and limits
    (`visible_gpus`: the local executor's GPUs for these jobs)."""
    if cluster.executor == "debug":
        return submitit.DebugExecutor(folder)
    if cluster.executor == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=cluster.max_requeues)
        executor.update_parameters(timeout_min=cluster.time_min, tasks_per_node=shape.processes_per_node,
                                   gpus_per_node=shape.gpus_per_node, visible_gpus=visible_gpus,
                                   signal_delay_s=cluster.signal_delay_s)  # fmt: skip
        return executor
    executor = submitit.SlurmExecutor(folder, max_num_timeout=cluster.max_requeues)
    parameters: dict[str, Any] = {
        "job_name": f"metalora-{shape.name}",
        "time": cluster.time_min,
        "nodes": shape.nodes,
        "ntasks_per_node": shape.processes_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "signal_delay_s": cluster.signal_delay_s,
    }
    optional = {"partition": cluster.partition, "account": cluster.account, "qos": cluster.qos,
                "constraint": cluster.constraint, "array_parallelism": cluster.array_parallelism,
                # asked for only when wanted: a cluster without GPUs refuses any GPU request, even of 0
                "gpus_per_node": shape.gpus_per_node,
                "mem": f"{cluster.mem_gb}GB" if cluster.mem_gb else ""}  # fmt: skip
    parameters.update({key: value for key, value in optional.items() if value})
    extra = dict(cluster.sbatch_options)
    if shape.after:
        extra["dependency"] = "afterok:" + ":".join(shape.after)
    parameters["additional_parameters"] = extra
    executor.update_parameters(**parameters)
    return executor


def sbatch_options(cluster: ClusterConfig, shape: JobShape) -> list[str]:
    """The job's request as sbatch command-line options (what `check_slurm_request` puts to SLURM)."""
    options = [f"--time={cluster.time_min}", f"--nodes={shape.nodes}", f"--ntasks-per-node={shape.processes_per_node}",
               f"--cpus-per-task={cluster.cpus_per_task}"]  # fmt: skip
    if shape.gpus_per_node:
        options.append(f"--gpus-per-node={shape.gpus_per_node}")
    if cluster.mem_gb:
        options.append(f"--mem={cluster.mem_gb}G")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cluster, key):
            options.append(f"--{key}={getattr(cluster, key)}")
    options += [f"--{key.replace('_', '-')}={value}" for key, value in cluster.sbatch_options.items()]
    return options


def check_slurm_request(cluster: ClusterConfig, shapes: list[JobShape]) -> None:
    """Put each job shape to SLURM with `sbatch --test-only`, which judges it as a real submission would (partition,
    account, time limit, GPUs and CPUs a node has) and queues nothing.

    Raises:
        ConfigError: sbatch is missing, or SLURM refused a request (its own one-line reason, with the options).
    """
    if shutil.which("sbatch") is None:
        raise ConfigError("cluster.executor=slurm, but there is no sbatch on PATH: run on a SLURM login node, or "
                          "set cluster.executor=local")  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as script:
        script.write("#!/bin/sh\ntrue\n")
        script.flush()
        asked: set[tuple[str, ...]] = set()
        for shape in shapes:
            options = sbatch_options(cluster, shape)
            if tuple(options) in asked:  # the same request: the same verdict
                continue
            asked.add(tuple(options))
            result = subprocess.run(["sbatch", "--test-only", *options, script.name], capture_output=True,
                                    text=True, check=False)  # fmt: skip
            if result.returncode != 0:
                said = [line.strip().removeprefix("sbatch: error: ") for line in result.stderr.splitlines()]
                reason = "; ".join(line for line in said if line) or f"sbatch exited with {result.returncode}"
                raise ConfigError(f"SLURM refuses the {shape.name} jobs' request ({' '.join(options)}): {reason}; "
                                  "nothing was submitted")  # fmt: skip
