"""What every bench table shares: the machine it ran on and how numbers are written."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np


def _machine(threads: int) -> dict[str, Any]:
    import importlib.metadata as md

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": threads, "python": platform.python_version()}
    for name in ("torch", "onnxruntime", "onnxruntime-gpu", "x-transformers", "numpy"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def machine_line(m: dict[str, Any]) -> str:
    return (f"- machine: {m['processor']}, {m['cpu_count']} CPUs ({m['threads']} threads used)"
            + (f", {m['gpu']}" if "gpu" in m else "") + f"; torch {m.get('torch')}, onnxruntime "
            f"{m.get('onnxruntime-gpu') or m.get('onnxruntime')}")


