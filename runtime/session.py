"""onnxruntime sessions: options, execution providers, and opening a file (any format).

The only module that decides how a session is built, so every format's file is opened the same way
(thread bounds, quiet logs, the CUDA provider's DLLs) and every failure to open is one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imadarem.runtime.errors import ImadaremError, ModelFileError
from imadarem.runtime.limits import MAX_THREADS_PER_CPU

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise ImadaremError(f"onnxruntime is not importable: {exc}") from None
    return onnxruntime


def check_threads(threads: Any) -> int | None:
    """A thread count onnxruntime may be given: None, or 1 .. MAX_THREADS_PER_CPU per core (its spinning
    pool of, say, a million threads stalls the machine instead of failing)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ImadaremError(f"threads must be a positive integer, got {threads!r}")
    most = MAX_THREADS_PER_CPU * (os.cpu_count() or 1)
    if threads > most:
        raise ImadaremError(f"threads must be at most {most} ({MAX_THREADS_PER_CPU} per CPU core here), got {threads}")
    return threads


def session_options(threads: int | None = None):
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4  # fatal only: a failed run is reported by its exception, as one line
    threads = check_threads(threads)
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def providers_for(provider: str) -> list[str]:
    ort = import_onnxruntime()
    if provider not in PROVIDERS:
        raise ImadaremError(f"unknown provider {provider!r} (choose from: {', '.join(PROVIDERS)})")
    if provider == "cuda":
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - only a help for finding CUDA libraries
                pass
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ImadaremError("provider 'cuda' is not available: install onnxruntime-gpu "
                                "(pip install 'imadarem[gpu]') on a machine with an NVIDIA GPU")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: str | os.PathLike, provider: str = "cpu", threads: int | None = None):
    """An onnxruntime session on ``path`` and its metadata_props (any format)."""
    path = str(path)
    if not Path(path).is_file():
        raise ModelFileError(f"model file not found: {path}")
    ort = import_onnxruntime()
    providers = providers_for(provider)
    options = session_options(threads)  # a bad thread count is the caller's error, not the file's
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path}: not a readable ONNX model ({first[:200]})") from None
    return session, dict(session.get_modelmeta().custom_metadata_map)


def run_failure(path: str, what: str, exc: Exception) -> ModelFileError:
    """One line for a graph that fails its probe call when opened (the tail of onnxruntime's message)."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return ModelFileError(f"{path}: {what} (onnxruntime: ...{detail[-120:]})")
