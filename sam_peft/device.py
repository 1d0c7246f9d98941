"""Where a run computes and in what precision, and what machine that is (provenance).

Device and precision resolution sit below the config (a run id depends on what `auto` means on
this CPU) and the engine (which autocasts as resolved here); `machine` is what result.json
records of the hardware, so that a table can warn when one cell mixes machines.
"""

from __future__ import annotations

import os
import platform
import warnings

import torch

from sam_peft.errors import UserError


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware: the `avx512_bf16` or `amx_bf16` flag of Linux's
    /proc/cpuinfo (`cpuinfo`: that file's text, for tests). False elsewhere, or when the file
    cannot be read. Without these instructions torch's CPU bf16 kernels convert to fp32 and back,
    and a bf16 step is slower than an fp32 one (docs/benchmarks.md)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolved_precision(precision: str, device: torch.device) -> str:
    """What `train.precision` means on a device: "fp32" or "bf16".

    auto: bf16 autocast on a GPU that supports it and on a CPU that computes bf16 in hardware
    (AVX512-BF16 or AMX, `cpu_has_native_bf16`), fp32 elsewhere. On such a CPU bf16 left the
    stand-in's means over seeds unchanged and made steps faster (README, `train.precision`); on a CPU
    without them bf16 is emulated and several times slower. config_hash gives an `auto` run on a
    native-bf16 CPU the id of a bf16 run, so that its results are never taken for fp32 ones.
    """
    if precision == "fp32":
        return "fp32"
    if device.type == "cuda":  # bf16 too: fp32 on a GPU without bf16 support
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":  # bf16: as asked, even where emulated (autocast_dtype warns)
        return "bf16" if precision == "bf16" or cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on a device (None: plain fp32), as
    `resolved_precision` says. bf16 asked for explicitly is taken as asked, with a warning on a CPU
    that only emulates it."""
    if resolved_precision(precision, device) == "fp32":
        return None
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("train.precision bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated there, "
                      "and a training step is several times slower than in fp32 (docs/benchmarks.md)",
                      stacklevel=2)
    return torch.bfloat16


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device '{device}': not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}': no CUDA device is available")
    return dev


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (/proc/cpuinfo's "model name", else platform.processor())."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def machine(device: torch.device) -> dict:
    """The hardware a run computed on: the accelerator's name on a GPU, the CPU's model, the
    cores the process may use and torch's intra-op threads (float results can depend on them)."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count()
    return {"device": gpu or cpu_model(), "gpu": gpu, "cpu": cpu_model(), "cpu_native_bf16": cpu_has_native_bf16(),
            "cores": cores, "threads": torch.get_num_threads(), "host": platform.node()}
