"""Export a causal model's fused decoder (``imadarem.training.causal.DecodeStep``) as one ONNX graph: a
*decode file* (model format "2", config ``"graph": "decode"``; docs/ARCHITECTURE.md, "Decode files").

One call of the graph is one draft-and-verify step of the gate selector (or, with ``drafts=0``, one
left-to-right step), sampling and state update included, so the runtime only feeds the state back: on a
GPU it binds the small state's two buffer sets alternately as inputs and outputs and each cache as both
(updated in place), and replays the call as a CUDA graph (``runtime/formats/decode.py``). Every dimension
but the batch is fixed.

Variants: ``fp32``; ``int8`` (dynamic quantisation of the weight MatMuls, CPUs); ``fp16`` (the model in
float16 with float16 caches, sampling in float32, GPUs; onnxruntime's transformer fusions applied).
Attention: ``matmul`` (MatMul, Softmax, MatMul over every slot; any provider) or, for one-token CPU files,
``gqa`` (onnxruntime's GroupQueryAttention: the cache written by the node itself, only filled slots read).
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
                  provenance: dict[str, Any] | None = None, attention: str = "matmul") -> Path:
    """Write ``model`` (a CausalLM with a tokenizer) as a decode file drafting ``drafts`` tokens per call
    (default: all its draft heads; 0: the left-to-right decoder). ``attention`` "gqa" (one-token files, CPU
    variants): onnxruntime's GroupQueryAttention instead of MatMul-Softmax-MatMul over every slot."""
    import onnx
    import torch
    from imadarem.training.causal import ATTENTIONS, DecodeStep

    if variant not in VARIANTS:
        raise ImadaremError(f"unknown variant {variant!r} ({', '.join(VARIANTS)})")
    if attention not in ATTENTIONS:
        raise ImadaremError(f"unknown attention {attention!r} ({', '.join(ATTENTIONS)})")
    if attention == "gqa" and (variant == "fp16" or (model.config.num_drafts if drafts is None else drafts)):
        raise ImadaremError("attention 'gqa' is for one-token CPU decode files: drafts 0 and variant fp32 or int8 "
                            "(onnxruntime's CPU GroupQueryAttention takes one new token a row)")
    out_path = Path(out_path)
    check_writable(out_path)
    model = model.eval().cpu()
    c = model.config
    if variant == "fp16":
        model = _half_copy(model)
    step = DecodeStep(model, drafts, attention=attention).eval()
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
            "decode_drafts": step.drafts, "decode_attention": attention}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _quiet_exporters():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "decode.onnx"
        with torch.no_grad():
            program = torch.onnx.export(step, args, dynamo=True, input_names=inputs, output_names=outputs,
                                        dynamic_shapes=dynamic, opset_version=OPSET, optimize=True, verbose=False,
                                        custom_translation_table={
                                            torch.ops.aten.div.Tensor_mode: _truncating_div,
                                            torch.ops.imadarem.cached_attention.default: _group_query_attention(c)})
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


def _group_query_attention(config):
    """``imadarem::cached_attention`` as com.microsoft GroupQueryAttention: the caches are its past and present
    (one buffer when the runtime binds them in place), ``seqlens_k`` each row's new slot, the total length the
    batch's largest slot + 1 (it attends to each row's own slots only; a total of every slot costs 2x)."""
    from onnx.defs import OpSchema
    from onnxscript import INT32
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    # onnx holds no schema of com.microsoft's operators; the exporter needs one to build the node: its inputs and
    # outputs as onnxruntime defines them (contrib_defs.cc), only those this graph uses
    schema = OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter(name, type_) for name, type_ in (
            ("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"), ("past_value", "T"),
            ("seqlens_k", "M"), ("total_sequence_length", "M"))],
        outputs=[OpSchema.FormalParameter(name, "T") for name in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "") for name in ("num_heads", "kv_num_heads")])
    group_query_attention = Op(Opset("com.microsoft", 1), "GroupQueryAttention", schema)

    def translate(q, k, v, k_cache, v_cache, slot):
        seqlens = op.Cast(slot, to=INT32.dtype)
        total = op.Cast(op.Add(op.ReduceMax(slot, keepdims=0), op.Constant(value_int=1)), to=INT32.dtype)
        return group_query_attention(q, k, v, k_cache, v_cache, seqlens, total, num_heads=config.num_heads,
                                     kv_num_heads=config.num_heads, _outputs=3)
    return translate


def _half_copy(model):
    """A float16 copy of ``model`` (embeddings, linear layers, norms; the export samples in float32)."""
    import copy

    return copy.deepcopy(model).half()


def _gpu_fusions(proto, config: dict[str, Any]):
    """onnxruntime's transformer fusions (SkipLayerNormalization, BiasGelu, ...) on the float16 graph."""
    from imadarem.export.onnx_export import _gpu_fusions as fuse

    return fuse(proto, config)
