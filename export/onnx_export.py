"""Checkpoint -> one self-describing ONNX file holding exactly one refinement step.

The graph has the step signature of docs/ARCHITECTURE.md (tokens, step, cond -> logits, gate, cond_next[, critic]) with
dynamic batch and length (length <= max_seq_len), and ``metadata_props`` carrying the config, the
tokenizer spec, the special ids, the format version and provenance. Variants: ``fp16`` (float16 weights
and compute, float32 inputs/outputs, for GPUs) and ``int8`` (onnxruntime dynamic quantisation of the
MatMul weights, for edge CPUs).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from imadarem.runtime import metadata as mf
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.files import check_output, replace_atomically, temporary_beside
from imadarem.runtime.formats.refine import (
    FORMAT,
    INPUTS,
    OUTPUTS,
    PACKED_INPUTS,
    VERIFY_INPUTS,
    VERIFY_OUTPUTS,
)
from imadarem.runtime.registry import tokenizer_origin, tokenizer_to_json

OPSET = 18


def _versions() -> dict[str, str]:
    out = {}
    for name in ("imadarem", "torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def build_metadata(model, provenance: dict[str, Any], fmt: str = FORMAT) -> dict[str, str]:
    """The model file's metadata_props for an ImplicitRefinementModel (format 1) or a CausalLM (format 2)."""
    if model.tokenizer is None:
        raise ImadaremError("the model has no tokenizer: build it as ImplicitRefinementModel(config, tokenizer) "
                            "to export it")
    cfg = model.config.to_dict()
    meta = {
        mf.KEY_FORMAT: fmt,
        mf.KEY_CONFIG: json.dumps(cfg, sort_keys=True),
        mf.KEY_TOKENIZER: tokenizer_to_json(model.tokenizer),
        mf.KEY_SPECIAL_IDS: json.dumps(model.special.as_dict()),
        mf.KEY_PROVENANCE: json.dumps(provenance, sort_keys=True),
    }
    origin = tokenizer_origin(model.tokenizer)
    if origin is not None:
        meta[mf.KEY_TOKENIZER_ORIGIN] = json.dumps(origin, sort_keys=True)
    return meta


def _step_module(model, names: list[str]):
    """The step as exported, its inputs ``names`` in order. Besides the model's own inputs: ``cond_rows`` (int64
    [batch]; ``--device-state``): ``cond`` is the previous step's ``cond_next`` as it was, and the graph itself
    picks the still-active rows and the first ``length`` positions, so the loop can leave ``cond`` on the GPU for
    the whole run (IO binding) while finished sequences leave the batch and the trailing padding is trimmed."""
    import torch

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            given = dict(zip(names, inputs))
            tokens, cond = given["tokens"], given["cond"]
            if "cond_rows" in given:
                cond = cond.index_select(0, given["cond_rows"])[:, : tokens.shape[1]]
            return self.model(tokens, given["step"], cond, given.get("draft_noise"), given.get("positions"),
                              given.get("attend"))

    return Step().eval()


def _restore_parameter_names(proto, module) -> None:
    """Give every parameter the exporter renamed its own name back (in place). A parameter read by a gather over a
    graph input (``pos_emb.decay`` at the packed ``positions``) comes out as an anonymous ``val_N`` initializer, and
    ``onnx_import`` rebuilds a model from a file by parameter names. An initializer is renamed only when it is the one
    unnamed initializer holding exactly that parameter's values."""
    from onnx import numpy_helper

    names = {init.name for init in proto.graph.initializer}
    renamed = {}
    for name, param in module.named_parameters():
        if name in names:
            continue
        value = param.detach().cpu().numpy()
        same = [init.name for init in proto.graph.initializer
                if init.name not in renamed and tuple(init.dims) == value.shape
                and init.data_type == 1 and (numpy_helper.to_array(init) == value).all()]
        if len(same) == 1:
            renamed[same[0]] = name
    for init in proto.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]


def export_model(model, out_path: str | os.PathLike, provenance: dict[str, Any] | None = None,
                 device_state: bool = False) -> Path:
    """Export an ImplicitRefinementModel (fp32, CPU) to ``out_path`` as a single file.

    ``device_state`` adds the optional ``cond_rows`` input (see ``_step_module``); a block model without a verifier
    takes ``positions`` and ``attend`` (formats/refine.py: ``PACKED_INPUTS``).
    """
    import onnx
    import torch

    model = model.eval().cpu()
    cfg = model.config
    batch, length = 2, min(8, cfg.max_seq_len)
    tokens = torch.full((batch, length), model.special.mask, dtype=torch.long)
    step = torch.zeros(batch, dtype=torch.long)
    cond = torch.zeros(batch, length, cfg.hidden_size)
    outputs = list(OUTPUTS) + (["critic"] if cfg.use_critic else [])  # the format's contract
    B = torch.export.Dim("batch", min=1, max=1 << 20)
    L = torch.export.Dim("length", min=1, max=cfg.max_seq_len)
    dynamic = {"tokens": {0: B, 1: L}, "step": {0: B}, "cond": {0: B, 1: L}}
    args, names = (tokens, step, cond), list(INPUTS)
    if device_state:
        CB = torch.export.Dim("cond_batch", min=1, max=1 << 20)
        CL = torch.export.Dim("cond_length", min=1, max=cfg.max_seq_len)
        args = (tokens, step, torch.zeros(batch + 1, length + 1, cfg.hidden_size), torch.arange(batch, dtype=torch.long))
        names.append("cond_rows")
        dynamic.update({"cond": {0: CB, 1: CL}, "cond_rows": {0: B}})
    if getattr(cfg, "verify_layers", 0):  # the verifier's single pass (formats/refine.py: VERIFY_INPUTS)
        args = args + (torch.zeros(batch, length, cfg.vocab_size),)
        names += list(VERIFY_INPUTS)
        dynamic["draft_noise"] = {0: B, 1: L}
        outputs += list(VERIFY_OUTPUTS)
    elif cfg.objective == "block":  # packed decoding states (formats/refine.py: PACKED_INPUTS)
        from imadarem.runtime import rules

        args = args + (torch.arange(length).repeat(batch, 1),
                       rules.block_attention(tokens, cfg.block_size, model.special.mask, model.special.pad))
        names += list(PACKED_INPUTS)
        dynamic.update({"positions": {0: B, 1: L}, "attend": {0: B, 1: L, 2: L}})
    module = _step_module(model, names)
    dynamic = (tuple(dynamic[name] for name in names),)  # forward(*inputs): one varargs entry
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "step.onnx"
        program = torch.onnx.export(module, args, dynamo=True, input_names=names,
                                    output_names=outputs, dynamic_shapes=dynamic, opset_version=OPSET,
                                    optimize=True, verbose=False)
        program.save(str(raw), external_data=False)
        proto = onnx.load(str(raw))
    _restore_parameter_names(proto, module)
    meta = build_metadata(model, provenance or {})
    write_with_metadata(proto, out_path, meta)
    return out_path


def write_with_metadata(proto, out_path: Path, meta: dict[str, str]) -> None:
    import onnx

    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "imadarem"
    # full_check runs ONNX shape inference, which does not know onnxruntime's contrib ops (fp16 fusions)
    standard = all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    onnx.checker.check_model(proto, full_check=standard)
    tmp = temporary_beside(out_path)
    try:
        onnx.save(proto, str(tmp), save_as_external_data=False)
        replace_atomically(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def convert_fp16(src: Path, dst: Path) -> Path:
    """float16 weights and compute, float32 inputs and outputs (onnxruntime's float16 converter), after
    onnxruntime's transformer fusions for GPUs (SkipLayerNormalization, BiasGelu: 13 + 6 in the default
    model), which halve the H100 step time at batch >= 1024 (BENCH-NOTES.md)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    proto = _gpu_fusions(proto, json.loads(meta[mf.KEY_CONFIG]))
    del proto.graph.value_info[:]  # stale float32 annotations would contradict the converted graph
    # softmax and sigmoid stay float32: they feed the sampled distribution and the gate
    half = convert_float_to_float16(proto, keep_io_types=True, op_block_list=["Softmax", "Sigmoid"])
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(half)
    wrapped.topological_sort()  # the converter appends its input casts after their users
    del wrapped.model.graph.value_info[:]
    write_with_metadata(wrapped.model, dst, meta)
    return dst


def _gpu_fusions(proto, config: dict[str, Any]):
    """The step graph with onnxruntime's transformer fusions (as for BERT-like encoders, GPU kernels)."""
    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # producer-name advice
    fused = optimizer.optimize_model(proto, model_type="bert", num_heads=int(config["num_heads"]),
                                     hidden_size=int(config["hidden_size"]), use_gpu=True, opt_level=0)
    proto = fused.model
    if not any(op.domain == "com.microsoft" for op in proto.opset_import):  # added on save only
        from onnx import helper

        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto


def _preprocessed(src: Path, tmp: str) -> Path:
    """onnxruntime's quantisation pre-processing (shape inference, folding), or ``src`` if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = Path(tmp) / "pre.onnx"
    cwd = os.getcwd()
    try:
        os.chdir(tmp)  # symbolic shape inference writes scratch files into the working directory
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
    except Exception:  # noqa: BLE001 - pre-processing only helps; quantise the original instead
        pre = src
    finally:
        os.chdir(cwd)
    logging.getLogger().setLevel(logging.ERROR)  # its pre-processing advice is already followed
    return pre


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation of MatMul weights: activations are quantised at run time with one scale per
    tensor, so a row's numbers depend on the rows beside it in the batch (a near tie can flip). Static
    quantisation (:func:`quantize_int8_static`) has no such effect. Weights use 7 of their 8 bits
    (``reduce_range``): on x86 CPUs without VNNI (AVX2 only) onnxruntime multiplies uint8 activations by int8
    weights with an instruction that adds two products into int16, which saturates at full range (measured on
    an AVX2 machine: a refine file's logits off by 0.96; with 7 bits, within 0.1)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    meta = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / "q.onnx"
        quantize_dynamic(str(_preprocessed(src, tmp)), str(q), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, reduce_range=True)
        proto = onnx.load(str(q))
    write_with_metadata(proto, dst, meta)
    return dst


def quantize_int8_static(src: Path, dst: Path, calibration: list[dict[str, Any]]) -> Path:
    """Static (calibrated) int8 quantisation of the weight MatMuls: int8 weights per output channel, and
    activation scales fixed from ``calibration`` (feeds of the graph, MinMax), in QDQ form. Every row is
    then computed on its own, so the outputs do not depend on the batch, on ``n`` or on the thread count:
    the same seed gives the same molecule in any batch. Products of two activations (attention) stay
    float32. Weights use 7 bits (``reduce_range``), as in :func:`quantize_int8`: on an AVX2 machine the bundled
    model's int8 logits were off by 1.80 at 8 bits and 1.26 at 7 (greedy agreement 0.964 and 0.973)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    meta = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    with tempfile.TemporaryDirectory() as tmp:
        pre = _preprocessed(src, tmp)
        proto = onnx.load(str(pre))
        weights = {i.name for i in proto.graph.initializer}
        nodes = [n.name for n in proto.graph.node
                 if n.op_type in ("MatMul", "Gemm") and any(x in weights for x in n.input)]
        q = Path(tmp) / "q.onnx"
        cwd = os.getcwd()
        try:
            os.chdir(tmp)  # the calibrator writes its augmented model into the working directory
            quantize_static(str(pre), str(q), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                            calibrate_method=CalibrationMethod.MinMax,
                            # float outputs: onnxruntime fuses each into MatMulIntegerToFloat with the fixed
                            # activation scale (no re-quantised output, no extra rounding)
                            extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
        finally:
            os.chdir(cwd)
        proto = onnx.load(str(q))
    write_with_metadata(proto, dst, meta)
    return dst


def quantize_int4(src: Path, dst: Path, block_size: int = 32) -> Path:
    """Weight-only int4 quantisation of the MatMul weights (onnxruntime's MatMulNBits, symmetric blocks of
    ``block_size``, int8 compute: ``accuracy_level`` 4); activations stay float32."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4)
    quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
    quantizer.process()
    write_with_metadata(quantizer.model.model, dst, meta)
    return dst


def check_writable(out_path: str | os.PathLike) -> None:
    """Refuse an output path that cannot be written before minutes of export, not after
    (``runtime/files.py``: a new path or a regular file only)."""
    check_output(out_path, "model file")


@contextlib.contextmanager
def _quiet_exporters():
    """The exporters' chatter is not the user's business: torch.onnx warns once per missing torchvision
    op, onnxruntime's symbolic shape inference (imported under several module names by its transformer
    tools) once per unresolved dynamic dimension. Logging up to WARNING is off while exporting; errors
    still show."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def export_checkpoint(checkpoint: str | os.PathLike, out_path: str | os.PathLike, weights: str = "ema",
                      variant: str = "fp32", device_state: bool | None = None, sampling: bool | None = None) -> Path:
    """A refinement checkpoint -> model file (``variant``: fp32, fp16 or int8; ``imadarem export`` takes any
    family's checkpoint: ``export/exporters.py``)."""
    from imadarem.training.checkpoint import build_model, load_checkpoint

    check_writable(out_path)
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt, weights)
    return export_refine(model, out_path, variant, device_state, sampling, checkpoint_provenance(ckpt, weights))


def checkpoint_provenance(ckpt, weights: str) -> dict[str, Any]:
    """Where a file's weights came from: the checkpoint, its hash and step, and the training data's hash."""
    return {"checkpoint": str(ckpt.path), "checkpoint_sha256": ckpt.file_hash(), "training_step": ckpt.step,
            "weights": weights, "data_sha256": ckpt.state.get("data_sha256"), "family": ckpt.state.get("family", "refine"),
            "preset": (ckpt.state.get("args") or {}).get("preset")}


def export_refine(model, out_path: str | os.PathLike, variant: str = "fp32", device_state: bool | None = None,
                  sampling: bool | None = None, provenance: dict[str, Any] | None = None) -> Path:
    """An ImplicitRefinementModel -> a refinement-step file (format 1). ``device_state`` and ``sampling`` (the
    sampling head, ``sampling_head.py``) default to on for the fp16 file, which is meant for GPUs."""
    if variant not in ("fp32", "fp16", "int8"):
        raise ImadaremError(f"a refinement model exports as fp32, fp16 or int8, not {variant!r}")
    provenance = {**(provenance or {}), "variant": variant, "tools": _versions(),
                  "parameters": model.num_parameters()}
    out_path = Path(out_path)
    if device_state is None:  # the fp16 file is meant for GPUs: keep the loop's state there
        device_state = variant == "fp16"
    if sampling is None:
        sampling = variant == "fp16"
    provenance["device_state"], provenance["sampling_head"] = device_state, sampling
    with tempfile.TemporaryDirectory() as tmp, _quiet_exporters():
        step_path = Path(tmp) / "step.onnx" if sampling else out_path  # the step, before the head
        if variant == "fp32":
            export_model(model, step_path, provenance, device_state)
        else:
            base = export_model(model, Path(tmp) / "fp32.onnx", provenance, device_state)
            (convert_fp16 if variant == "fp16" else quantize_int8)(base, step_path)
        if sampling:
            add_sampling_head(step_path, out_path, model)
    return out_path


def add_sampling_head(src: Path, dst: Path, model) -> Path:
    """``src`` with the sampling head grafted on (after fp16 conversion or quantisation: it stays fp32)."""
    import onnx
    from imadarem.export.sampling_head import export_head, graft_sampling_head

    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    cfg, sp = model.config, model.special
    head = export_head(cfg.vocab_size, sp.mask, sp.eos, cfg.max_seq_len, OPSET)
    write_with_metadata(graft_sampling_head(proto, head), dst, meta)
    return dst
