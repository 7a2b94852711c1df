"""Benchmarks say what they ran on: the processor's name, torch's instruction set, threads, GPU."""

import json
import platform

import torch

from metalora.machine import cpu_model_name, describe_machine, machine_line


def test_the_processor_name_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: avx2\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 7B13\n")  # fmt: skip
    assert cpu_model_name(cpuinfo) == "AMD EPYC 7B13"


def test_an_arm_kernels_hardware_line_names_the_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 48.00\n\nHardware\t: BCM2835\n")
    assert cpu_model_name(cpuinfo) == "BCM2835"


def test_without_cpuinfo_the_name_falls_back_to_what_platform_knows(tmp_path):
    assert cpu_model_name(tmp_path / "absent") == (platform.processor() or platform.machine())


def test_the_description_matches_this_process():
    machine = describe_machine()
    assert machine["torch_threads"] == torch.get_num_threads()
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["torch"] == torch.__version__
    assert (machine["gpu"] is None) == (not torch.cuda.is_available())


def test_the_caption_names_processor_instruction_set_threads_and_gpu():
    machine = {"cpu": "AMD EPYC", "architecture": "x86_64", "logical_cpus": 2, "torch_threads": 2,
               "cpu_capability": "AVX2", "torch": "2.13.0+cpu", "gpu": None}  # fmt: skip
    assert machine_line(machine) == "AMD EPYC (x86_64, AVX2), 2 logical CPUs, torch 2.13.0+cpu on 2 threads, no GPU"
    with_gpu = machine_line({**machine, "gpu": "NVIDIA H100 80GB HBM3"})
    assert with_gpu.endswith("GPU NVIDIA H100 80GB HBM3")


def test_metalora_info_reports_the_machine_and_the_parameter_counts(capsys):
    from metalora.cli import main

    assert main(["info", "params/base.yaml", "params/smoke.yaml"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["machine"]["cpu"] == cpu_model_name()
    assert info["scenario"] == "heldout" and info["samples_per_task"] == 40 and info["training_seeds"] == 1
    assert info["machine"]["torch_threads"] == torch.get_num_threads()
    assert 0 < info["lora_parameters"] < info["base_parameters"]
