"""Model-file formats: one module each, and the one place that picks a file's format.

``open_model(path_or_name)`` opens the session, reads the metadata, asks each format whether it
``matches`` and opens the file with the one that does. Nothing outside this package branches on a
file's format: the Generator asks the opened model for a plan (docs/ARCHITECTURE.md, "Formats").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imadarem.runtime.errors import ModelFileError
from imadarem.runtime.formats import causal, decode, refine
from imadarem.runtime.formats.base import Format, ModelFile
from imadarem.runtime.metadata import KEY_FORMAT, config_of
from imadarem.runtime.models import resolve_model
from imadarem.runtime.session import open_session
from imadarem.runtime.strategy import Model

#: every format this runtime reads; the first that matches a file opens it
FORMATS: tuple[Format, ...] = (refine.SPEC, causal.SPEC, decode.SPEC)


def format_of(meta: dict[str, str], path: str) -> Format:
    """The format whose ``matches`` accepts ``meta``, or a one-line error."""
    if KEY_FORMAT not in meta:
        raise ModelFileError(f"{path}: not an Imadarem model file (metadata {KEY_FORMAT!r} is missing)")
    for spec in FORMATS:
        if spec.matches(meta):
            return spec
    graph = (config_of(meta) or {}).get("graph")
    what = f"model format {meta[KEY_FORMAT]!r}" + (f" with graph {graph!r}" if graph is not None else "")
    raise ModelFileError(f"{path}: {what} is not supported by this Imadarem (it reads: "
                         f"{'; '.join(spec.summary for spec in FORMATS)})")


def open_model(path_or_name: str | os.PathLike | None = None, provider: str = "cpu",
               threads: int | None = None, expect: str | None = None) -> ModelFile:
    """The checked model file at a path, or a bundled model by name (default: the bundled default);
    ``expect`` names the only format the caller can use (one line for another)."""
    path = str(resolve_model(path_or_name))
    session, meta = open_session(path, provider, threads)
    spec = format_of(meta, path)
    if expect is not None and spec.name != expect:
        raise ModelFileError(f"{path}: a {spec.name} model file ({spec.summary}), where a {expect} one was expected")
    return spec.open(path, session, meta, provider, threads)


def describe_model(path_or_name: str | os.PathLike | None = None) -> dict[str, Any]:
    """What ``imadarem inspect`` shows. The parameter count is the PyTorch model's, recorded in the
    provenance at export (the graph's initializers count differently for int8 and fp16 files, and reading
    them needs the onnx package, which the runtime never imports)."""
    model = open_model(path_or_name)
    sess = model.session
    return {
        "path": model.path,
        "bytes": Path(model.path).stat().st_size,
        "format": model.metadata.get(KEY_FORMAT),
        "kind": model.format_name,
        "parameters": model.provenance.get("parameters"),
        "config": model.config,
        "tokenizer": {"adapter": model.tokenizer.name, "vocab_size": model.tokenizer.vocab_size},
        "special_ids": model.special.as_dict(),
        "inputs": [{"name": i.name, "type": i.type, "shape": i.shape} for i in sess.get_inputs()],
        "outputs": [{"name": o.name, "type": o.type, "shape": o.shape} for o in sess.get_outputs()],
        "provenance": model.provenance,
        "decoding": model.common.decoding,
    }


__all__ = ["FORMATS", "Format", "Model", "ModelFile", "describe_model", "format_of", "open_model"]
