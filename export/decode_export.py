"""Export a causal model's fused decoder (``imadarem.training.causal.DecodeStep``) as one ONNX graph: a
*decode file* (model format "2", config ``"graph": "decode"``; docs/ARCHITECTURE.md, "Decode files").

One call of the graph is one draft-and-verify step of the gate selector (or, with ``drafts=0``, one
left-to-right step), sampling and state update included, so the runtime only feeds the state back: on a
GPU it binds two sets of device buffers alternately as inputs and outputs and replays the call as a
CUDA graph (``runtime/formats/decode.py``). Every dimension but the batch is fixed.

Variants: ``fp32``; ``int8`` (dynamic quantisation of the weight MatMuls, CPUs); ``fp16`` (the model in
float16 with float16 caches, sampling in float32, GPUs; onnxruntime's transformer fusions applied).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from imadarem.export.onnx_export import (
    OPSET,
    _quiet_exporters,
    _versions,
    build_metadata,
    check_writable,
    quantize_int8,
    quantize_int8_static,
    write_with_metadata,
)
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.formats.decode import FORMAT, KEY_START, STATE, DecodeConfig, io_names, state_names
from imadarem.runtime.metadata import KEY_CONFIG

#: int8: static (calibrated) quantisation, batch-invariant; int8dyn: dynamic, for comparisons only
VARIANTS = ("fp32", "fp16", "int8", "int8dyn")


def export_decode(model, out_path: str | os.PathLike, drafts: int | None = None, variant: str = "fp32",
                  provenance: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a CausalLM with a tokenizer) as a decode file drafting ``drafts`` tokens per call
    (default: all its draft heads; 0: the left-to-right decoder)."""
    import onnx
    import torch
    from imadarem.training.causal import DecodeStep

    if variant not in VARIANTS:
        raise ImadaremError(f"unknown variant {variant!r} ({', '.join(VARIANTS)})")
    out_path = Path(out_path)
    check_writable(out_path)
    model = model.eval().cpu()
    c = model.config
    if variant == "fp16":
        model = _half_copy(model)
    step = DecodeStep(model, drafts).eval()
    inputs, outputs = io_names(c.num_layers)
    batch = 3
    state = step.started_state(torch.arange(batch, dtype=torch.long), 1.0,
                               dtype=torch.float16 if variant == "fp16" else torch.float32)
    names = state_names(c.num_layers)
    args = tuple(state[n] for n in names) + (torch.arange(batch, dtype=torch.long), torch.ones(1))
    B = torch.export.Dim("batch", min=1, max=1 << 20)
    state_dims = tuple({0: B} for _ in STATE)
    dynamic = state_dims + (tuple({0: B} for _ in names[len(STATE):]) + ({0: B}, None),)  # forward(*rest)
    config = DecodeConfig(**{**vars(c), "num_drafts": step.drafts, "cache_len": step.slots}).to_dict()
    info = {"tools": _versions(), "parameters": model.num_parameters(), **(provenance or {}), "variant": variant,
            "decode_drafts": step.drafts}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _quiet_exporters():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "decode.onnx"
        with torch.no_grad():
            program = torch.onnx.export(step, args, dynamo=True, input_names=inputs, output_names=outputs,
                                        dynamic_shapes=dynamic, opset_version=OPSET, optimize=True, verbose=False,
                                        custom_translation_table={torch.ops.aten.div.Tensor_mode: _truncating_div})
        program.save(str(raw), external_data=False)
        proto = onnx.load(str(raw))
        meta = build_metadata(model, info, FORMAT)
        meta[KEY_CONFIG] = json.dumps(config, sort_keys=True)
        meta[KEY_START] = json.dumps(step.start_outputs())
        if variant == "fp16":
            proto = _gpu_fusions(proto, config)
        if variant in ("int8", "int8dyn"):
            fp32 = Path(tmp) / "fp32.onnx"
            write_with_metadata(proto, fp32, meta)
            if variant == "int8":
                quantize_int8_static(fp32, out_path, decode_calibration_feeds(fp32))
            else:
                quantize_int8(fp32, out_path)
        else:
            write_with_metadata(proto, out_path, meta)
    return out_path


def decode_calibration_feeds(path: str | os.PathLike, n: int = 256, seed: int = 0, batch: int = 64) -> list[dict]:
    """The states a decode file is fed while it samples ``n`` molecules of its own (seed ``seed``), one feed
    per call: what static int8 quantisation fixes its activation scales from."""
    from imadarem.runtime.formats import open_model
    from imadarem.runtime.randomness import SampleStreams
    from imadarem.runtime.request import Request

    model = open_model(path, expect="decode")
    request = Request.checked(n, None, None, None, None, seed, None, batch, False, None, {})
    plan = model.plan(request)
    feeds = []
    for first in range(0, n, batch):
        decoding = plan.start(batch, SampleStreams(request.seed, first, batch))
        while decoding.active:
            feeds.append(decoding.feed())
            decoding.step()
    return feeds


def _truncating_div(self, other, rounding_mode=None):
    """aten.div with rounding_mode="trunc" on int64 tensors, which is ONNX's integer Div exactly. (The
    exporter's own translation goes through float32, which cannot hold the counter hash's 62-bit
    intermediates; the decode graph divides nothing else with a rounding mode.)"""
    from onnxscript import opset18 as op

    if rounding_mode != "trunc":
        raise NotImplementedError(f"the decode graph exports only truncating integer division, not {rounding_mode!r}")
    return op.Div(self, op.CastLike(other, self))


def _half_copy(model):
    """A float16 copy of ``model`` (embeddings, linear layers, norms; the export samples in float32)."""
    import copy

    return copy.deepcopy(model).half()


def _gpu_fusions(proto, config: dict[str, Any]):
    """onnxruntime's transformer fusions (SkipLayerNormalization, BiasGelu, ...) on the float16 graph."""
    from imadarem.export.onnx_export import _gpu_fusions as fuse

    return fuse(proto, config)
