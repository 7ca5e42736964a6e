"""What every bench table shares: the machine it ran on and how numbers are written."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np


def _machine(threads: int) -> dict[str, Any]:
    import importlib.metadata as md

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "threads": threads,
            "python": platform.python_version()}
    for name in ("torch", "onnxruntime", "onnxruntime-gpu", "x-transformers", "numpy"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


#: the instruction sets that decide int8 and fp32 GEMM speed on x86 (VNNI: int8 dot products)
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def _cpu_model() -> str | None:
    """The CPU's model name and its SIMD flags (Linux), e.g. "AMD EPYC; avx2": the lent machines differ between
    sessions, and a speed from one is not comparable with another's (only ratios within one run are)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    field = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in lines if ":" in line}
    flags = set(field.get("flags", "").split())
    simd = ", ".join(f for f in SIMD_FLAGS if f in flags)
    return "; ".join(x for x in (field.get("model name"), simd) if x) or None


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def machine_line(m: dict[str, Any]) -> str:
    return (f"- machine: {m['processor']}" + (f" ({m['cpu_model']})" if m.get("cpu_model") else "")
            + f", {m['cpu_count']} CPUs ({m['threads']} threads used)"
            + (f", {m['gpu']}" if "gpu" in m else "") + f"; torch {m.get('torch')}, onnxruntime "
            f"{m.get('onnxruntime-gpu') or m.get('onnxruntime')}")


