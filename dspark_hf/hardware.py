"""What this machine computes fast, for the defaults that depend on it and the record of every measurement,
and how to time work queued on an accelerator.

An AVX2-only CPU emulates bfloat16 matrix products several times slower than float32, while CPUs with AMX or
AVX-512 BF16 run them faster than float32: the faster training and decoding dtype depends on the CPU.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX or AVX-512 BF16)."""
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", _cpu_flags()))


def cpu_description() -> dict:
    """CPU model, torch's kernel capability and native bfloat16: what a timing depends on."""
    model_names = re.findall(r"model name\s*:\s*(.+)", _cpu_flags())
    return {
        "model": model_names[0] if model_names else platform.processor(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
    }


def synchronize(device: torch.device | str) -> None:
    """Wait for the kernels queued on `device`, so that a wall-clock timing covers them (no-op on CPU, where
    every operation has finished when it returns)."""
    device = torch.device(device)
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "synchronize"):
        backend.synchronize()


__all__ = ["cpu_description", "cpu_has_native_bf16", "synchronize"]
