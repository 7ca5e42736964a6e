"""``imadarem export``: any family's checkpoint, or a model file to rebuild from, -> a model file.

The source's family decides what is written (``training/families/``): a refinement step (format 1) for
``refine``; a causal step (format 2) or, with ``decode``, a decode file for ``causal``. Shapes, tokenizer and
family come from the checkpoint; a wrong or foreign source, or an option the family has no use for, is one
line before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imadarem.runtime.errors import CheckpointError, ImadaremError, ModelFileError

DTYPES = ("fp32", "fp16", "int8", "int4")


@dataclass
class Source:
    """What an export starts from: the PyTorch model, its family and where it came from."""

    model: Any
    family: str
    provenance: dict[str, Any]
    reference: Any = None  # a checkpoint to check the file against (refine), when there is one


def load_source(source: str | os.PathLike, weights: str = "ema") -> Source:
    """A run folder, a checkpoint folder, or a model file (its weights rebuilt in PyTorch; an int8 file is
    dequantised), a bundled model by name included."""
    from imadarem.runtime.models import bundled_path

    path = Path(source)
    if not path.exists() and bundled_path(str(source)) is not None:
        path = bundled_path(str(source))
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {source} (give a run folder, a checkpoint, a model file or a "
                              "bundled model's name)")
    if path.is_file():
        return _from_file(path)
    from imadarem.export.onnx_export import checkpoint_provenance
    from imadarem.training.checkpoint import build_model, family_of, load_checkpoint

    ckpt = load_checkpoint(path)
    return Source(build_model(ckpt, weights), family_of(ckpt).name, checkpoint_provenance(ckpt, weights), ckpt.path)


def _from_file(path: Path) -> Source:
    from imadarem.runtime.formats import open_model

    try:
        kind = open_model(path).format_name
    except ModelFileError as exc:
        raise ModelFileError(f"{exc} (give a run folder, a checkpoint or an Imadarem model file)") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    provenance = {"rebuilt_from": path.name, "source_sha256": digest}
    if kind == "refine":
        from imadarem.export.onnx_import import model_from_onnx

        model, report = model_from_onnx(path)
        return Source(model, "refine", {**provenance, "dequantized": report.quantized})
    if kind == "causal":
        from imadarem.export.onnx_import import causal_from_onnx

        model, report = causal_from_onnx(path)
        return Source(model, "causal", {**provenance, "dequantized": report.quantized})
    raise ModelFileError(f"{path}: a {kind} file holds no step to rebuild; export from the step file or the "
                         "checkpoint it was made from")


def check_options(family: str, dtype: str, decode: bool, drafts: int | None, refine_options: bool,
                  num_drafts: int | None = None, attention: str = "matmul") -> None:
    """One line for an option the source's family has no use for, or a dtype it cannot be written in."""
    if attention != "matmul" and not decode:
        raise ImadaremError(f"--attention {attention} is for --decode files")
    if family == "refine":
        if decode or drafts is not None:
            raise ImadaremError("--decode and --drafts are for causal models; this is a refine (Imadarem V) model")
        if dtype not in ("fp32", "fp16", "int8"):
            raise ImadaremError(f"a refine model exports as fp32, fp16 or int8, not {dtype}")
        return
    if refine_options:
        raise ImadaremError("--device-state and --sampling are for refine models; this is a causal model")
    if decode and dtype == "int4":
        raise ImadaremError("--decode files are fp32, int8 or fp16 (int4 measured slower: docs/bench-notes.md)")
    if not decode and dtype == "fp16":
        raise ImadaremError("--dtype fp16 writes decode files (GPUs): add --decode")
    if drafts is not None and num_drafts is not None and drafts > num_drafts:
        raise ImadaremError(f"--drafts {drafts}: the model has {num_drafts} draft heads")


def export_source(src: Source, out_path: str | os.PathLike, dtype: str = "fp32", decode: bool = False,
                  drafts: int | None = None, device_state: bool | None = None, sampling: bool | None = None,
                  check: bool = True, attention: str = "matmul") -> dict[str, Any]:
    """Write ``src`` to ``out_path``; the summary ``imadarem export`` prints (with the parity check)."""
    out_path = Path(out_path)
    if src.family == "refine":
        from imadarem.export.onnx_export import export_refine

        export_refine(src.model, out_path, dtype, device_state, sampling, src.provenance)
        summary = {"output": str(out_path), "family": "refine", "dtype": dtype}
        if check and src.reference is not None:
            from imadarem.export.parity import parity_report

            summary.update(parity_report(src.reference, out_path, weights=src.provenance.get("weights", "ema")))
    else:
        summary = _export_causal(src, out_path, dtype, decode, drafts, check, attention)
    summary["bytes"] = out_path.stat().st_size
    return summary


def _export_causal(src: Source, out_path: Path, dtype: str, decode: bool, drafts: int | None,
                   check: bool, attention: str = "matmul") -> dict[str, Any]:
    from imadarem.export.causal_export import calibration_feeds, causal_parity, export_causal
    from imadarem.export.decode_export import export_decode
    from imadarem.export.onnx_export import _quiet_exporters, quantize_int4, quantize_int8_static

    model, provenance = src.model, {**src.provenance, "variant": dtype}
    if decode:
        export_decode(model, out_path, drafts, dtype, provenance, attention)
        return {"output": str(out_path), "family": "causal", "graph": "decode", "dtype": dtype,
                "drafts": model.config.num_drafts if drafts is None else drafts, "attention": attention}
    if drafts is not None:
        model = model.without_drafts(drafts)
    if dtype == "fp32":
        export_causal(model, out_path, provenance)
    else:
        with tempfile.TemporaryDirectory() as tmp, _quiet_exporters():
            if dtype == "int8":  # static: the same molecule for the same seed in any batch
                provenance["quantization"] = "static int8 (QDQ, MinMax over 256 of its own molecules)"
                fp32 = export_causal(model, Path(tmp) / "fp32.onnx", provenance)
                quantize_int8_static(fp32, out_path, calibration_feeds(fp32))
            else:
                quantize_int4(export_causal(model, Path(tmp) / "fp32.onnx", provenance), out_path)
    summary = {"output": str(out_path), "family": "causal", "dtype": dtype, "drafts": model.config.num_drafts}
    if check:
        summary.update(causal_parity(model, out_path))
    return summary


def stamp_decoding(out_path: str | os.PathLike, selector: str, options: dict[str, Any],
                   drafts: int | None = None) -> dict[str, Any]:
    """Record the file's recommended decoding (``imadarem.decoding``: the selector, options and drafts a request
    that names no selector gets), once the written file shows it can run them (one sample); a file that
    cannot is removed and the error is one line (`imadarem export` puts back a file the export replaced)."""
    import onnx
    from imadarem.export.onnx_export import write_with_metadata
    from imadarem.runtime import metadata as mf
    from imadarem.runtime.formats import open_model
    from imadarem.runtime.generator import Generator
    from imadarem.runtime.refinement import make_selector

    out_path = Path(out_path)
    try:
        model = open_model(out_path)
        make_selector(selector, options, model.outputs, str(out_path))
        if drafts is not None:
            Generator(model).generate(1, seed=0, selector=selector, drafts=drafts, **options)
    except ImadaremError:
        out_path.unlink(missing_ok=True)
        raise
    proto = onnx.load(str(out_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    decoding = {"selector": selector, "options": options, **({"drafts": drafts} if drafts is not None else {})}
    meta[mf.KEY_DECODING] = json.dumps(decoding, sort_keys=True)
    write_with_metadata(proto, out_path, meta)
    return decoding
