"""Read and check an Imadarem model file: one ONNX refinement step plus its metadata_props.

Only onnxruntime is used (never the onnx package): the metadata comes from the session's model meta,
the shapes from its input/output descriptions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from imadarem.runtime.errors import ImadaremError, ModelFileError
from imadarem.runtime.limits import MAX_THREADS_PER_CPU
from imadarem.runtime.registry import tokenizer_from_json, tokenizer_origin
from imadarem.runtime.tokenizer import (
    SpecialIds,
    TokenizerAdapter,
    check_special_ids,
    resolve_special_ids,
)

FORMAT_VERSION = "1"
SUPPORTED_FORMATS = {"1"}  # refinement steps; "2" (CAUSAL_FORMAT) is a causal step with a KV cache
CAUSAL_FORMAT = "2"
KEY_FORMAT = "imadarem.format"
KEY_CONFIG = "imadarem.config"
KEY_TOKENIZER = "imadarem.tokenizer"
KEY_SPECIAL_IDS = "imadarem.special_ids"
KEY_PROVENANCE = "imadarem.provenance"
KEY_TOKENIZER_ORIGIN = "imadarem.tokenizer_origin"  # {"name", "version"} of the adapter's distribution
REQUIRED_INPUTS = ("tokens", "step", "cond")
REQUIRED_OUTPUTS = ("logits", "gate", "cond_next")
#: the optional sampling head (imadarem.export.sampling_head): all of these, or none
SAMPLING_INPUTS = ("uniform", "temperature", "logit_bias")
SAMPLING_OUTPUTS = ("proposals", "proposal_prob", "entropy", "top1", "top2", "current_prob")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class TokenizerOriginWarning(UserWarning):
    """A model file's tokenizer is rebuilt by another distribution or version than it was exported with."""


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise ImadaremError(f"onnxruntime is not importable: {exc}") from None
    return onnxruntime


def session_options(threads: int | None = None, optimized_path: str | None = None):
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4  # fatal only: a failed run is reported by its exception, as one line
    if threads:
        most = MAX_THREADS_PER_CPU * (os.cpu_count() or 1)
        if int(threads) > most:
            raise ImadaremError(f"threads must be at most {most} ({MAX_THREADS_PER_CPU} per CPU core here), got {threads}")
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
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


def checked_fields(cls, config: dict[str, Any], path: str) -> dict[str, Any]:
    """The values of a typed config dataclass's fields, each checked: bool, int >= 1 (or the field's
    ``min`` metadata), or a finite number >= 0; a bad one is a one-line ModelFileError naming it."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = config.get(f.name)
        if f.type == "bool":
            ok, value, kind = isinstance(raw, bool), raw, "true or false"
        elif f.type == "int":
            low = f.metadata.get("min", 1)
            ok = isinstance(raw, int) and not isinstance(raw, bool) and raw >= low
            value, kind = raw, "a positive integer" if low == 1 else f"an integer >= {low}"
        else:
            ok = isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw) and raw >= 0
            value, kind = (float(raw) if ok else raw), "a number >= 0"
        if not ok:
            raise ModelFileError(f"{path}: model config {f.name} must be {kind}, got {raw!r}")
        values[f.name] = value
    return values


@dataclass(frozen=True)
class ModelConfig:
    """A typed view of the model config the runtime reads (the ``imadarem.config`` metadata).

    The metadata keeps every field the trainer recorded; selectors still see that whole dict as
    ``StepState.config``. The loop reads only these, checked once when the file is opened.
    """

    vocab_size: int
    hidden_size: int
    max_seq_len: int
    max_refinement_steps: int
    stop_threshold: float
    sampling_temperature: float
    min_refine_uncertainty: float
    use_refine_gate: bool

    @classmethod
    def from_dict(cls, config: dict[str, Any], path: str = "model") -> ModelConfig:
        """Check types and ranges; a bad value is a one-line ModelFileError naming the field."""
        values = checked_fields(cls, config, path)
        if values["stop_threshold"] > 1:
            raise ModelFileError(f"{path}: model config stop_threshold must be in [0, 1], got {values['stop_threshold']!r}")
        return cls(**values)


@dataclass
class ModelFile:
    """A checked model file: its session, config, tokenizer and special ids."""

    path: str
    session: Any
    config: dict[str, Any]
    tokenizer: TokenizerAdapter
    special: SpecialIds
    outputs: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @cached_property
    def typed_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config, self.path)

    @property
    def has_critic(self) -> bool:
        return "critic" in self.outputs

    @property
    def device_state(self) -> bool:
        """The graph takes ``cond_rows`` and picks active rows / positions of ``cond`` itself."""
        return "cond_rows" in self.input_names

    @property
    def graph_sampling(self) -> bool:
        """The graph has the sampling head (``imadarem export --sampling``): it samples proposals and
        computes the selectors' uncertainty measures itself, from ``uniform``, ``temperature`` and
        ``logit_bias``."""
        return "uniform" in self.input_names

    @cached_property
    def input_names(self) -> list[str]:
        """The graph's input names (looked up once: ``feed`` runs every step)."""
        get_inputs = getattr(self.session, "get_inputs", None)
        return [i.name for i in get_inputs()] if get_inputs is not None else []

    def feed(self, tokens, step, cond, sampling: tuple | None = None) -> dict[str, Any]:
        """The inputs of one step on host arrays (``cond`` already [batch, length, hidden]).

        ``sampling`` = (uniform, temperature, logit_bias) for a graph with the sampling head; left out,
        it gets greedy sampling with no bans (the step's own outputs do not depend on it).
        """
        import numpy as np

        feed = {"tokens": tokens, "step": step, "cond": cond}
        if self.device_state:
            feed["cond_rows"] = np.arange(tokens.shape[0], dtype=np.int64)
        if self.graph_sampling:
            b, length = tokens.shape
            if sampling is None:
                sampling = (np.full((b, length), 0.5, np.float32), np.zeros(b, np.float32),
                            np.zeros((length, self.vocab_size), np.float32))
            feed.update(zip(SAMPLING_INPUTS, sampling))
        return feed

    @property
    def hidden_size(self) -> int:
        return self.typed_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.typed_config.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.typed_config.max_seq_len


def _json_field(meta: dict[str, str], key: str, path: str) -> Any:
    if key not in meta:
        raise ModelFileError(f"{path}: not an Imadarem model file (metadata {key!r} is missing)")
    try:
        return json.loads(meta[key])
    except ValueError as exc:
        raise ModelFileError(f"{path}: metadata {key!r} is not valid JSON ({exc})") from None


def model_format(meta: dict[str, str], path: str) -> str:
    fmt = meta.get(KEY_FORMAT)
    if fmt is None:
        raise ModelFileError(f"{path}: not an Imadarem model file (metadata {KEY_FORMAT!r} is missing)")
    if fmt not in SUPPORTED_FORMATS | {CAUSAL_FORMAT}:
        raise ModelFileError(f"{path}: model format {fmt!r} is not supported by this Imadarem "
                             f"(supported: {', '.join(sorted(SUPPORTED_FORMATS | {CAUSAL_FORMAT}))})")
    return fmt


def check_metadata(meta: dict[str, str], path: str, typed: type = None, fmt: str = FORMAT_VERSION
                   ) -> tuple[dict, TokenizerAdapter, SpecialIds, dict]:
    """Validate the metadata on its own (format, config keys, tokenizer, special ids); ``typed`` is the
    config's typed view (``ModelConfig`` for format 1)."""
    typed = typed or ModelConfig
    if model_format(meta, path) != fmt:
        raise ModelFileError(f"{path}: a format {meta[KEY_FORMAT]} model file where format {fmt} was expected")
    config = _json_field(meta, KEY_CONFIG, path)
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: metadata {KEY_CONFIG!r} must be a JSON object")
    missing = [f.name for f in dataclasses.fields(typed) if f.name not in config]
    if missing:
        raise ModelFileError(f"{path}: model config lacks {', '.join(missing)}")
    typed.from_dict(config, path)  # types and ranges, before anything reads a value
    if KEY_TOKENIZER not in meta:
        raise ModelFileError(f"{path}: not an Imadarem model file (metadata {KEY_TOKENIZER!r} is missing)")
    try:
        tokenizer = tokenizer_from_json(meta[KEY_TOKENIZER])
        special = resolve_special_ids(tokenizer)
    except ImadaremError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    if tokenizer.vocab_size != int(config["vocab_size"]):
        raise ModelFileError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model config says "
                             f"vocab_size {config['vocab_size']}")
    stored = _json_field(meta, KEY_SPECIAL_IDS, path)
    if not isinstance(stored, dict):
        raise ModelFileError(f"{path}: metadata {KEY_SPECIAL_IDS!r} must be a JSON object")
    try:
        check_special_ids(stored, int(config["vocab_size"]), tokenizer.name)
    except ImadaremError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    if stored != special.as_dict():
        raise ModelFileError(f"{path}: stored special ids {stored} contradict the tokenizer's {special.as_dict()}")
    provenance = _json_field(meta, KEY_PROVENANCE, path) if KEY_PROVENANCE in meta else {}
    if not isinstance(provenance, dict):
        raise ModelFileError(f"{path}: metadata {KEY_PROVENANCE!r} must be a JSON object")
    check_tokenizer_origin(meta, tokenizer, path)
    return config, tokenizer, special, provenance


def check_tokenizer_origin(meta: dict[str, str], tokenizer: TokenizerAdapter, path: str) -> None:
    """Warn when the adapter that rebuilt the tokenizer comes from another distribution or version than
    the one the model was exported with (another plugin may use the same name and decode differently)."""
    if KEY_TOKENIZER_ORIGIN not in meta:
        return  # files written before the origin was recorded
    recorded = _json_field(meta, KEY_TOKENIZER_ORIGIN, path)
    if not isinstance(recorded, dict):
        raise ModelFileError(f"{path}: metadata {KEY_TOKENIZER_ORIGIN!r} must be a JSON object")
    here = tokenizer_origin(tokenizer)
    if here != recorded:
        now = f"{here['name']} {here['version']}" if here else "a class from no installed distribution"
        warnings.warn(f"{path}: its tokenizer {tokenizer.name!r} was exported with {recorded.get('name')} "
                      f"{recorded.get('version')} but is read here by {now}; the ids may decode differently",
                      TokenizerOriginWarning, stacklevel=3)


def _last_dim(node) -> int | None:
    shape = node.shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def check_graph(session, config: dict[str, Any], path: str) -> list[str]:
    """Check the graph's inputs and outputs against the contract and the config; return output names."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    for name in REQUIRED_INPUTS:
        if name not in inputs:
            raise ModelFileError(f"{path}: graph has no input {name!r} (has: {', '.join(inputs)})")
    for name in REQUIRED_OUTPUTS:
        if name not in outputs:
            raise ModelFileError(f"{path}: graph has no output {name!r} (has: {', '.join(outputs)})")
    if "uniform" in inputs:
        missing = [n for n in SAMPLING_INPUTS if n not in inputs] + [n for n in SAMPLING_OUTPUTS if n not in outputs]
        if missing:
            raise ModelFileError(f"{path}: graph has a partial sampling head (missing {', '.join(missing)})")
    expected = {"tokens": "tensor(int64)", "step": "tensor(int64)", "cond": "tensor(float)"}
    for name, dtype in expected.items():
        if inputs[name].type != dtype:
            raise ModelFileError(f"{path}: input {name!r} is {inputs[name].type}, expected {dtype}")
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    for node, want, what in ((inputs["cond"], hidden, "hidden_size"), (outputs["cond_next"], hidden, "hidden_size"),
                             (outputs["logits"], vocab, "vocab_size")):
        got = _last_dim(node)
        if got is not None and got != want:
            raise ModelFileError(f"{path}: {node.name!r} has last dimension {got} but the config says {what} {want}")
    return list(outputs)


def probe(session, model: ModelFile) -> None:
    """Run the step once on one all-mask row of ``max_seq_len`` positions: a graph that contradicts its
    metadata (a position table shorter than ``max_seq_len``, a wrong vocabulary) fails here, when the file
    is opened, rather than in the middle of a run."""
    import numpy as np

    length, vocab = model.max_seq_len, model.vocab_size
    tokens = np.full((1, length), model.special.mask, dtype=np.int64)
    feed = model.feed(tokens, np.zeros(1, np.int64), np.zeros((1, length, model.hidden_size), np.float32))
    try:
        logits = session.run(["logits"], feed)[0]
    except Exception as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelFileError(f"{model.path}: the graph cannot run one step at the config's max_seq_len {length} "
                             f"(onnxruntime: ...{detail[-120:]})") from None
    if logits.shape != (1, length, vocab):
        raise ModelFileError(f"{model.path}: one step at max_seq_len {length} gave logits of shape "
                             f"{list(logits.shape)}; the config says [1, {length}, {vocab}]")


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


def load_model_file(path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                    opened: tuple | None = None) -> ModelFile:
    """Open ``path`` with onnxruntime and check metadata and graph against each other (format 1: one
    refinement step; format 2, a causal step with a KV cache, is ``runtime/causal.py``'s)."""
    path = str(path)
    session, meta = opened or open_session(path, provider, threads)
    config, tokenizer, special, provenance = check_metadata(meta, path)
    outputs = check_graph(session, config, path)
    model = ModelFile(path, session, config, tokenizer, special, outputs, provenance, meta)
    probe(session, model)
    return model


def default_model_path() -> Path | None:
    """The model bundled with the package, if one is installed."""
    here = Path(__file__).resolve().parent / "models"
    for name in ("default.onnx", "default-int8.onnx"):
        if (here / name).is_file():
            return here / name
    return None


def describe_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """What ``imadarem inspect`` shows. The parameter count is the PyTorch model's, recorded in the
    provenance at export (the graph's initializers would count differently for int8 and fp16 files, and
    reading them needs the onnx package, which the runtime never imports)."""
    opened = open_session(path)
    if opened[1].get(KEY_FORMAT) == CAUSAL_FORMAT:
        from imadarem.runtime.causal import load_causal_file
        from imadarem.runtime.decode import is_decode, load_decode_file

        load = load_decode_file if is_decode(opened[1]) else load_causal_file
        mfile = load(str(path), opened=opened)
    else:
        mfile = load_model_file(path, opened=opened)
    params = mfile.provenance.get("parameters")
    sess = mfile.session
    return {
        "path": str(path),
        "bytes": Path(path).stat().st_size,
        "format": mfile.metadata.get(KEY_FORMAT),
        "parameters": params,
        "config": mfile.config,
        "tokenizer": {"adapter": mfile.tokenizer.name, "vocab_size": mfile.tokenizer.vocab_size},
        "special_ids": mfile.special.as_dict(),
        "inputs": [{"name": i.name, "type": i.type, "shape": i.shape} for i in sess.get_inputs()],
        "outputs": [{"name": o.name, "type": o.type, "shape": o.shape} for o in sess.get_outputs()],
        "provenance": mfile.provenance,
    }
