"""What a benchmark ran on, recorded with its figures.

Timings on a "2-core x86_64" box mean little without the processor: fresh machines of the same
size can come with processors of very different matmul rates, so every benchmark writes the processor's
model name, the vector instructions torch dispatches to, the threads and the accelerator beside its numbers.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_model_name(cpuinfo: Path = CPUINFO) -> str:
    """The processor's model name from `cpuinfo` (Linux), else what `platform` knows.

    Args:
        cpuinfo: the file to read (Linux's /proc/cpuinfo; a test passes its own).

    Returns:
        e.g. "AMD EPYC 7B13", or the architecture ("x86_64") where no name can be found.
    """
    try:
        lines = cpuinfo.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        # x86 says "model name"; some ARM kernels name the processor only on a "Hardware" line.
        if key.strip() in ("model name", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, object]:
    """The machine a benchmark runs on, as a JSON-ready dict.

    Returns:
        cpu (model name), architecture, logical_cpus, torch_threads, cpu_capability (the vector
        instruction set torch's CPU kernels use, e.g. AVX2 or AVX512), torch version, and gpu (the
        CUDA device's name, or None).
    """
    return {
        "cpu": cpu_model_name(),
        "architecture": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def machine_line(machine: dict[str, object]) -> str:
    """One line for a table's caption: processor, instruction set, threads, GPU.

    Args:
        machine: what `describe_machine` returned.

    Returns:
        e.g. "AMD EPYC (x86_64, AVX2), 2 logical CPUs, torch 2.13.0+cpu on 2 threads, no GPU".
    """
    gpu = f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU"
    return (
        f"{machine['cpu']} ({machine['architecture']}, {machine['cpu_capability']}), "
        f"{machine['logical_cpus']} logical CPUs, torch {machine['torch']} on {machine['torch_threads']} threads, {gpu}"
    )
