"""Model file -> PyTorch model: rebuild an ImplicitRefinementModel from an exported step.

Why: a deployed model file is often all there is (the bundled default model ships without its
training checkpoint), yet comparing the runtime with the PyTorch loop (``imadarem bench``) needs the
same weights in PyTorch. The metadata gives the config and tokenizer; the initializers give the
weights, dequantised when the file is int8.

The dynamo exporter keeps parameter names for biases, norms and embeddings but folds each
``nn.Linear`` weight into an anonymous transposed constant (``val_48``). Those are matched to the
model's Linear layers in the order the layers run, which is the order of the MatMul nodes in the
topologically sorted graph, checking every shape on the way. The result is then checked numerically
against onnxruntime, so a mismatched mapping can never pass silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from imadarem.runtime import metadata as mf
from imadarem.runtime.errors import ModelFileError
from imadarem.runtime.formats import open_model


@dataclass
class ImportReport:
    path: Path
    quantized: bool  # weights were dequantised from int8
    max_abs_logit_diff: float  # PyTorch model vs onnxruntime on a random batch


def _initializers(proto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def _weight_of(name: str, inits: dict[str, np.ndarray]) -> np.ndarray | None:
    """The float weight behind a MatMul input: an initializer, or a dequantised int8 one."""
    if name in inits and inits[name].dtype.kind == "f":
        return inits[name].astype(np.float32)
    base = name[: -len("_quantized")] if name.endswith("_quantized") else None
    if base and f"{base}_scale" in inits:
        q = inits[name].astype(np.float32)
        scale = inits[f"{base}_scale"].astype(np.float32)
        zero = inits.get(f"{base}_zero_point", np.zeros_like(scale)).astype(np.float32)
        if scale.ndim == 1 and scale.size > 1:  # per output channel (axis 1 of a [in, out] MatMul weight)
            return (q - zero[None, :]) * scale[None, :]
        return (q - zero) * scale
    return None


def _linear_call_order(model, forward) -> list[str]:
    """Names of the nn.Linear layers in the order one ``forward(model)`` calls them."""
    import torch

    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            forward(model)
    finally:
        for h in hooks:
            h.remove()
    return order


def _refinement_forward(model) -> None:
    import torch

    tokens = torch.full((1, 2), model.special.mask, dtype=torch.long)
    model(tokens, torch.zeros(1, dtype=torch.long), model.zero_cond(tokens))


def _causal_forward(model) -> None:
    import torch

    past, valid = model.empty_cache(1)
    model.step(torch.full((1, 2), model.special.mask, dtype=torch.long), torch.arange(2)[None], past, valid)


def _dequantized_weights(proto, inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Output name -> float weight of every DequantizeLinear on an initializer (a static int8 file holds its
    MatMul weights that way: int8 values, a scale per output channel along ``axis``, a zero point)."""
    out = {}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = inits[node.input[0]].astype(np.float32)
        scale = inits[node.input[1]].astype(np.float32)
        zero = inits[node.input[2]].astype(np.float32) if len(node.input) > 2 and node.input[2] in inits \
            else np.zeros_like(scale)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:  # per channel along ``axis``
            shape = [1] * q.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        out[node.output[0]] = (q - zero) * scale
    return out


def _load_weights(model, proto, path: Path, forward) -> bool:
    """Fill ``model``'s parameters from the graph's initializers (dequantised when int8): named ones by
    name, the exporter's anonymous transposed Linear weights in the order ``forward`` calls the layers.
    Returns whether the file was quantised."""
    import torch

    inits = _initializers(proto)
    inits.update(_dequantized_weights(proto, inits))  # static (QDQ) int8 files: the weights behind each DQ
    quantized = any(n.op_type in ("MatMulInteger", "DequantizeLinear") for n in proto.graph.node)
    state = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}

    for key, tensor in state.items():  # named parameters: biases, norms, embeddings, named Gemm weights
        for candidate, transpose in ((key, False), (f"{key}_quantized", False), (f"{key}_Transposed_quantized", True)):
            w = _weight_of(candidate, inits) if candidate in inits else None
            if w is not None:
                w = w.T if transpose else w
                if tuple(w.shape) == tuple(tensor.shape):
                    loaded[key] = torch.from_numpy(np.ascontiguousarray(w))
                    break

    # anonymous transposed Linear weights, in the order the graph multiplies by them
    matmul_weights = []
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "MatMulInteger", "Gemm") and len(node.input) > 1:
            w = _weight_of(node.input[1], inits) if node.input[1] in inits else None
            if w is not None and w.ndim == 2:
                matmul_weights.append((node.input[1], w))
    pending = iter(matmul_weights)
    for name in _linear_call_order(model, forward):
        key = f"{name}.weight"
        if key in loaded:
            continue
        want = tuple(state[key].shape)  # [out, in]; the graph holds [in, out]
        for source, w in pending:
            if source == "t" or any(source.startswith(k) for k in state):
                continue  # named weights (and the tied output projection, tok_emb.weight) are loaded by name
            if tuple(w.T.shape) == want:
                loaded[key] = torch.from_numpy(np.ascontiguousarray(w.T))
                break
        else:
            raise ModelFileError(f"{path.name}: cannot find the weight of layer {name!r} in the graph")

    missing = sorted(set(state) - set(loaded))
    if missing:
        raise ModelFileError(f"{path.name}: the graph does not hold {', '.join(missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''}")
    model.load_state_dict(loaded)
    return quantized


def _strip_prefix(proto, prefix: str) -> None:
    """Rename initializers ``prefix.x`` to ``x`` (the exporters' wrapper modules hold the model as a
    submodule), in the graph's node inputs too."""
    renamed = {init.name: init.name[len(prefix):] for init in proto.graph.initializer if init.name.startswith(prefix)}
    for init in proto.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]


def model_from_onnx(path: str | os.PathLike, check: bool = True, tolerance: float | None = None):
    """(ImplicitRefinementModel, ImportReport) rebuilt from the model file at ``path``.

    ``tolerance`` bounds max |Δlogits| between the rebuilt model and onnxruntime (default 1e-3 for
    float files; int8 files are only reported, their activations being quantised at run time).
    """
    import onnx
    from imadarem.runtime.registry import tokenizer_from_json
    from imadarem.training.config import ImplicitRefinementConfig
    from imadarem.training.model import ImplicitRefinementModel

    path = Path(path)
    mfile = open_model(path, expect="refine")  # the runtime's own checks on the metadata and the graph
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    config = ImplicitRefinementConfig.from_dict(json.loads(meta[mf.KEY_CONFIG]))
    model = ImplicitRefinementModel(config, tokenizer_from_json(meta[mf.KEY_TOKENIZER])).eval()
    _strip_prefix(proto, "model.")  # the export's step wrapper (onnx_export._step_module) holds the model as "model"
    quantized = _load_weights(model, proto, path, _refinement_forward)
    diff = _compare(model, mfile) if check else float("nan")
    limit = tolerance if tolerance is not None else (None if quantized else 1e-3)
    if check and limit is not None and not diff <= limit:
        raise ModelFileError(f"{path.name}: rebuilt PyTorch model disagrees with the graph "
                             f"(max |Δlogits| {diff:.3g} > {limit:g})")
    return model, ImportReport(path, quantized, diff)


def _compare(model, mfile) -> float:
    import torch

    rng = np.random.default_rng(0)
    cfg = model.config
    sp = model.special
    length = min(cfg.max_seq_len, 24)
    tokens = rng.integers(0, cfg.vocab_size, (3, length))
    tokens[tokens == sp.pad] = sp.mask
    tokens[0, length // 2:] = sp.mask
    step = np.array([0, 1, cfg.max_refinement_steps - 1], dtype=np.int64)
    cond = (rng.standard_normal((3, length, cfg.hidden_size)) * 0.1).astype(np.float32)
    ort_logits = mfile.session.run(["logits"], mfile.feed(tokens, step, cond))[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens), torch.from_numpy(step), torch.from_numpy(cond))[0].numpy()
    return float(np.abs(ref - ort_logits).max())


def causal_from_onnx(path: str | os.PathLike, check: bool = True, tolerance: float | None = None):
    """(CausalLM, ImportReport) rebuilt from the causal model file (format 2) at ``path``: what the
    decode-graph export (``export/decode_export.py``), the PyTorch loop and ``imadarem bench`` start from
    when a file is all there is (the bundled model ships without its weights file). An int8 file is
    dequantised: its weights, with onnxruntime's activation quantisation left out."""
    import onnx
    import torch
    from imadarem.runtime.formats.causal import CausalConfig
    from imadarem.runtime.registry import tokenizer_from_json
    from imadarem.training.causal import CausalLM

    path = Path(path)
    cfile = open_model(path, expect="causal")  # the runtime's own checks on the metadata and the graph
    proto = onnx.load(str(path))
    _strip_prefix(proto, "model.")
    meta = {p.key: p.value for p in proto.metadata_props}
    model = CausalLM(CausalConfig.from_dict(json.loads(meta[mf.KEY_CONFIG]), str(path)),
                     tokenizer_from_json(meta[mf.KEY_TOKENIZER])).eval()
    quantized = _load_weights(model, proto, path, _causal_forward)
    diff = float("nan")
    if check:
        rng = np.random.default_rng(0)
        tokens = rng.integers(4, model.config.vocab_size, (3, 6)).astype(np.int64)
        tokens[:, 0] = model.special.mask
        positions = np.broadcast_to(np.arange(6), tokens.shape).astype(np.int64)
        past, valid = cfile.empty_cache(3)
        got = cfile.run(tokens, positions, past, valid)[0]
        with torch.no_grad():
            want = model.step(*(torch.from_numpy(a) for a in (tokens, positions, past, valid)))[0].numpy()
        diff = float(np.abs(got - want).max())
    limit = tolerance if tolerance is not None else (None if quantized else 1e-3)
    if check and limit is not None and not diff <= limit:
        raise ModelFileError(f"{path.name}: rebuilt PyTorch model disagrees with the graph "
                             f"(max |Δlogits| {diff:.3g} > {limit:g})")
    return model, ImportReport(path, quantized, diff)
