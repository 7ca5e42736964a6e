"""Format 1, the refinement step: one bidirectional model step with self-conditioning.

**Contract** (``imadarem.format`` "1"). Inputs ``tokens`` int64 [batch, length] (``mask_id`` where
unknown, ``pad_id`` after EOS), ``step`` int64 [batch] (the refinement step t), ``cond`` float32
[batch, length, hidden] (the previous step's ``cond_next``; zeros at t = 0) and, optionally, ``cond_rows``
int64 [batch] (the graph picks those rows of ``cond`` and its first ``length`` positions itself, so the
state never leaves a GPU). Outputs ``logits`` float32 [batch, length, vocab], ``gate`` [batch, length]
(refine probability), ``cond_next`` [batch, length, hidden] and optionally ``critic`` [batch, length].
The optional sampling head adds inputs ``uniform`` [batch, length], ``temperature`` [batch],
``logit_bias`` [length, vocab] and outputs ``proposals`` (int64), ``proposal_prob``, ``entropy``,
``top1``, ``top2``, ``current_prob``: all of them or none. A block model's optional verifier adds input
``draft_noise`` float32 [batch, length, vocab] and outputs ``drafts`` int64 [batch, length] (argmax of
``logits`` + ``draft_noise``) and ``verify_logits`` [batch, length, vocab] (each position's left-to-right
conditional given the drafts placed at the masks before it in its block): all of them or none. A block model
without a verifier may take ``positions`` int64 [batch, length] and ``attend`` bool [batch, length, length] (each
position's place in the sequence, and which keys each query sees, before PAD keys are hidden and each query is
let see itself): both or neither. The host then feeds a plain call the model's own, ``arange`` and
``rules.block_attention``, and draft-and-verify packs the states of a row into one sequence. Batch and
length are dynamic, length <= ``max_seq_len`` (a packed sequence may be longer: its positions are not). Config: :class:`RefineConfig`.

**Decoding**: the refinement loop (``runtime/refinement.py``) with any selector; the default is ``gate``,
or ``entropy`` for a model trained without its gate (``use_refine_gate`` false). Each call runs the step on
the active rows, only up to the last committed EOS among them (what follows is frozen padding, which
attention ignores), on a block model only up to its current block (``rules.row_windows``, with zero
``cond``: the block objective never self-conditions), and samples proposals on the host with each sample's own uniforms, or in the graph
when the file has the sampling head. On CUDA the self-conditioning state stays on the GPU (IO binding); a block
model has none to keep (zeros go up with the tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.bans import ban_logits, run_bias
from imadarem.runtime.errors import ImadaremError, ModelFileError
from imadarem.runtime.formats import block_verify
from imadarem.runtime.formats.base import Format, ModelFile
from imadarem.runtime.formats.block_verify import BlockVerifyStep, ZeroCond
from imadarem.runtime.formats.self_verify import SelfVerifyStep
from imadarem.runtime.limits import MAX_SEQ_LEN, MAX_VOCAB
from imadarem.runtime.metadata import KEY_FORMAT, check_metadata, checked_fields
from imadarem.runtime.prompt import prompt_layout
from imadarem.runtime.randomness import SampleStreams
from imadarem.runtime.refinement import PRESENTED_OUTPUTS, LoopSettings, ModelStep, RefinementPlan, Shown
from imadarem.runtime.request import Request
from imadarem.runtime.session import run_failure
from imadarem.runtime.strategy import Plan

FORMAT = "1"
INPUTS = ("tokens", "step", "cond")
INPUT_TYPES = {"tokens": "tensor(int64)", "step": "tensor(int64)", "cond": "tensor(float)"}
#: the optional inputs' types, checked when present
OPTIONAL_INPUT_TYPES = {"positions": "tensor(int64)", "attend": "tensor(bool)"}
OUTPUTS = ("logits", "gate", "cond_next")
#: the optional sampling head (imadarem.export.sampling_head): all of these, or none
SAMPLING_INPUTS = ("uniform", "temperature", "logit_bias")
SAMPLING_OUTPUTS = ("proposals", "proposal_prob", "entropy", "top1", "top2", "current_prob")
#: a block model's optional verifier (training/model.py, ``verify_layers``): all of these, or none
VERIFY_INPUTS = ("draft_noise",)
VERIFY_OUTPUTS = ("drafts", "verify_logits")
#: a block model's packed states (formats/block_verify.py): both, or neither
PACKED_INPUTS = ("positions", "attend")


@dataclass(frozen=True)
class RefineConfig:
    """The config values the loop reads (the file keeps every field the trainer recorded; selectors see
    that whole dict as ``StepState.config``)."""

    vocab_size: int = field(metadata={"max": MAX_VOCAB})
    hidden_size: int
    max_seq_len: int = field(metadata={"max": MAX_SEQ_LEN})
    max_refinement_steps: int
    stop_threshold: float
    sampling_temperature: float

    @classmethod
    def from_dict(cls, config: dict[str, Any], path: str = "model") -> RefineConfig:
        values = checked_fields(cls, config, path)
        try:
            decode_block(config)
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
        if values["stop_threshold"] > 1:
            raise ModelFileError(f"{path}: model config stop_threshold must be in [0, 1], got {values['stop_threshold']!r}")
        return cls(**values)


def matches(meta: dict[str, str]) -> bool:
    return meta.get(KEY_FORMAT) == FORMAT


def decode_block(config: dict[str, Any]) -> int:
    """How many positions a model decodes at a time, left to right: ``block_size`` for a model trained with
    the ``block`` objective (its attention hides later blocks until they hold a token), 0 (all positions at
    once) for any other."""
    if config.get("objective") != "block":
        return 0
    block = config.get("block_size")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ModelFileError(f"model config block_size must be a positive integer for a block model, got {block!r}")
    return block


class RefineFile(ModelFile):
    """A checked format-1 file."""

    format_name = "refine"

    @property
    def outputs(self) -> list[str]:
        return self.extra["outputs"]

    @property
    def input_names(self) -> list[str]:
        return self.extra["inputs"]

    @property
    def hidden_size(self) -> int:
        return self.typed.hidden_size

    @property
    def has_critic(self) -> bool:
        return "critic" in self.outputs

    @property
    def device_state(self) -> bool:
        """The graph takes ``cond_rows`` and picks active rows / positions of ``cond`` itself."""
        return "cond_rows" in self.input_names

    @property
    def graph_sampling(self) -> bool:
        """The graph has the sampling head: it samples proposals and computes the selectors'
        uncertainty measures itself."""
        return "uniform" in self.input_names

    @property
    def self_verifying(self) -> bool:
        """The graph drafts and verifies in one row (formats/self_verify.py)."""
        return "draft_noise" in self.input_names

    @property
    def packs(self) -> bool:
        """The graph takes ``positions`` and ``attend``: one row may hold several states (formats/block_verify.py)."""
        return "attend" in self.input_names

    @cached_property
    def _zero_noise(self) -> ZeroCond:
        """The ``draft_noise`` of a call whose drafts nobody reads: one zero buffer, grown once, viewed per call."""
        return ZeroCond(self.vocab_size)

    @property
    def default_selector(self) -> str:
        """``gate``, or for a model trained without its gate the gate-off rule ``entropy``."""
        return "gate" if self.config.get("use_refine_gate", True) is not False else "entropy"

    def feed(self, tokens, step, cond, sampling: tuple | None = None, draft_noise=None,
             packed: tuple | None = None) -> dict[str, Any]:
        """The inputs of one step on host arrays. ``sampling`` = (uniform, temperature, logit_bias) for a
        graph with the sampling head; left out, greedy with no bans (the step's own outputs do not depend
        on it). ``draft_noise`` for a graph with a verifier; left out, zeros (the loop reads neither output).
        ``packed`` = (positions, attend) for a graph that takes them; left out, the model's own: positions
        0 .. length - 1 and ``rules.block_attention`` of ``tokens``."""
        feed = {"tokens": tokens, "step": step, "cond": cond}
        if self.packs:
            if packed is None:
                b, length = tokens.shape
                packed = (np.broadcast_to(np.arange(length, dtype=np.int64), (b, length)),
                          rules.block_attention(tokens, decode_block(self.config), self.special.mask, self.special.pad))
            feed.update(zip(PACKED_INPUTS, packed))
        elif packed is not None:
            raise ValueError(f"{self.name} takes no positions and attention")
        if self.self_verifying:
            feed["draft_noise"] = self._zero_noise(*tokens.shape) if draft_noise is None else draft_noise
        if self.device_state:
            feed["cond_rows"] = np.arange(tokens.shape[0], dtype=np.int64)
        if self.graph_sampling:
            b, length = tokens.shape
            if sampling is None:
                sampling = (np.full((b, length), 0.5, np.float32), np.zeros(b, np.float32),
                            np.zeros((length, self.vocab_size), np.float32))
            feed.update(zip(SAMPLING_INPUTS, sampling))
        return feed

    def plan(self, request: Request) -> Plan:
        cfg = self.typed
        block = decode_block(self.config)
        drafts = self.chosen_drafts(request)
        if drafts is not None:
            if not block:
                raise ImadaremError(f"{self.name} is a refinement model without blocks: drafts applies to causal "
                                    "files and block refine models")
            if drafts > block - 1:
                raise ImadaremError(f"drafts {drafts}: {self.name} drafts inside its blocks of {block}, "
                                    f"at most {block - 1}")
            return self._verify_plan(request, block, drafts)
        layout = prompt_layout(request, self.tokenizer, self.special, cfg.max_seq_len)
        settings = LoopSettings(
            num_steps=cfg.max_refinement_steps if request.steps is None else request.steps,
            temperature=cfg.sampling_temperature if request.temperature is None else request.temperature,
            stop_threshold=cfg.stop_threshold if request.stop_threshold is None else request.stop_threshold,
            layout=layout, trajectory=request.trajectory, config=dict(self.config), block=block)
        bias = run_bias(layout, self.tokenizer, self.special, cfg.vocab_size)
        selector, options = self.chosen_selector(request, self.default_selector)

        def new_step(size: int, streams: SampleStreams) -> ModelStep:
            return SelfConditionedStep(self, size, settings, bias, streams)
        return RefinementPlan(settings, selector, options, self.outputs, self.path, self.special,
                              new_step)

    def _verify_plan(self, request: Request, block: int, drafts: int) -> Plan:
        """Draft-and-verify (formats/block_verify.py): the left-to-right samples of a block model, the
        selector choosing which of the presented drafts to place."""
        cfg = self.typed
        layout = prompt_layout(request, self.tokenizer, self.special, cfg.max_seq_len)
        temperature = cfg.sampling_temperature if request.temperature is None else request.temperature
        settings = LoopSettings(
            # each call commits at least one exact token, so max_seq_len + 1 calls verify every row; no early
            # stop on a quiet step, and no block rule in the loop: a row ends when it is all verified (the
            # step verifies drafts at the next open positions only and masks the rest again)
            num_steps=cfg.max_seq_len + 1 if request.steps is None else request.steps,
            temperature=temperature, stop_threshold=0.0 if request.stop_threshold is None else request.stop_threshold,
            layout=layout, trajectory=request.trajectory, config=dict(self.config))
        bias = run_bias(layout, self.tokenizer, self.special, cfg.vocab_size)
        selector, options = self.chosen_selector(request, "gate")

        step_class = SelfVerifyStep if self.self_verifying else BlockVerifyStep

        def new_step(size: int, streams: SampleStreams) -> ModelStep:
            return step_class(self, size, layout, temperature, bias, streams.keys(), drafts, block)
        return RefinementPlan(settings, selector, options, PRESENTED_OUTPUTS, self.path, self.special, new_step)


class SelfConditionedStep(ModelStep):
    """Run the step on the active rows (up to the last committed EOS among them), keep ``cond_next``, and
    sample proposals on the host or read them from the sampling head."""

    #: sample and measure uncertainty inside the graph when the file has the sampling head (off: the numpy
    #: path, e.g. to compare the two)
    graph_sampling = True
    #: run the model only up to the last committed EOS of the active rows; off only to measure what it saves
    trim_padding = True
    #: a block model: run only the blocks up to its current one (rules.row_windows); off only to compare
    window_blocks = True

    def __init__(self, model: RefineFile, n: int, settings: LoopSettings, bias: np.ndarray, streams: SampleStreams):
        self.model, self.settings, self.bias, self.streams = model, settings, bias, streams
        length = settings.layout.length
        self.length, self.cut = length, length
        self.in_graph = self.graph_sampling and model.graph_sampling
        self.block = settings.block
        if self.block:  # a block model trains without self-conditioning: zeros, and only the window it needs
            self.cond = _ZeroCond(model)
        else:
            self.cond = (_DeviceCond if model.provider == "cuda" else _HostCond)(model, n, length)

    def keep(self, rows: np.ndarray) -> None:
        self.cond.keep(rows)

    def run(self, x, fz, t, num_steps, step_temperature, rows) -> Shown:
        eos = self.model.special.eos
        first = None
        if eos is not None:  # each row's first EOS; the model runs up to the last committed one (exact:
            first = rules.first_eos(x, eos)  # what follows is frozen padding; never increases)
            if self.trim_padding:
                self.cut = min(self.cut, int(first.max()) + 1)
        length, cut = self.length, self.cut
        windows = np.full(x.shape[0], cut)
        if self.block and self.window_blocks and t < num_steps - 1:  # the last step fills every mask left
            sp = self.model.special
            open_mask = (x == sp.mask) & ~fz
            targets = np.where(open_mask.any(-1), open_mask.argmax(-1), 0)
            windows = np.minimum(cut, rules.row_windows(x, targets, sp.mask, sp.pad, self.block))
            cut = int(windows.max(initial=1))
        step = np.full(x.shape[0], rules.model_step(t, num_steps, self.model.typed.max_refinement_steps), np.int64)
        temperatures = np.full(x.shape[0], step_temperature, np.float32)
        # each row draws its uniforms for the full length, whatever the others' cut
        uniform = self.streams.uniforms(rows, (length,)) if self.in_graph else None

        def run(part: np.ndarray, w: int) -> dict[str, np.ndarray]:
            whole = part.size == x.shape[0]
            feed_x = np.ascontiguousarray(x[:, :w] if whole else x[part, :w])
            sampling = None
            if uniform is not None:
                sampling = (np.ascontiguousarray(uniform[part, :w]), temperatures[part], self.bias[:w])
            return self.cond.run(feed_x, step[part], sampling)

        started = time.perf_counter()
        # a block model's rows may need different windows: on a CPU they run in up to three groups
        split = bool(self.block) and self.model.provider != "cuda"
        out = block_verify.run_by_window(run, windows, split)
        seconds = time.perf_counter() - started
        if cut < length:
            out = _widen(out, length)
        gate, critic = out.get("gate"), out.get("critic")
        if self.in_graph:
            measures = {"entropy": out["entropy"], "top2": (out["top1"], out["top2"]),
                        "proposal_prob": out["proposal_prob"], "current_prob": out["current_prob"]}
            logits = _LazyLogits(out["logits"], length, self.bias, first, eos)
            return Shown(x, fz, out["proposals"], logits, gate, critic, measures, seconds, cut)
        logits = out["logits"]
        ban_logits(logits, self.bias, first, eos)
        logits = _read_only(logits)
        uniforms = (None if step_temperature <= rules.GREEDY_TEMPERATURE
                    else self.streams.uniforms(rows, logits.shape[1:]))
        return Shown(x, fz, sample_proposals(logits, step_temperature, uniforms), logits, gate, critic, None,
                     seconds, cut)


def sample_proposals(logits: np.ndarray, temperature: float, uniforms: np.ndarray | None) -> np.ndarray:
    """Gumbel-max sampling from softmax(logits / temperature); argmax when temperature is 0.

    ``uniforms``: one draw per logit, of shape logits.shape (ignored, and may be None, at temperature 0);
    the PyTorch reference loop draws the same numbers and so samples the same tokens for the same seed.
    """
    if temperature <= rules.GREEDY_TEMPERATURE:
        return logits.argmax(-1)
    return rules.gumbel_max(logits, np.float32(temperature), uniforms)


class _ZeroCond:
    """``cond`` of a block model (block_verify.ZeroCond): zeros, so each call may run a different window."""

    def __init__(self, model: RefineFile):
        self.model, self.zeros = model, ZeroCond(model.hidden_size)

    def run(self, tokens: np.ndarray, step: np.ndarray, sampling: tuple | None = None) -> dict[str, np.ndarray]:
        cond = self.zeros(*tokens.shape)
        outs = self.model.session.run(None, self.model.feed(tokens, step, cond, sampling))
        return dict(zip(self.model.outputs, outs))

    def keep(self, rows: np.ndarray) -> None:
        pass


class _HostCond:
    """``cond`` as a numpy array: run the step with ``session.run`` and keep ``cond_next``."""

    def __init__(self, model: RefineFile, n: int, length: int):
        self.model = model
        self.value = np.zeros((n, length, model.hidden_size), dtype=np.float32)

    def run(self, tokens: np.ndarray, step: np.ndarray, sampling: tuple | None = None) -> dict[str, np.ndarray]:
        b, cut = tokens.shape
        cond = self.value if self.value.shape[:2] == (b, cut) else np.ascontiguousarray(self.value[:, :cut])
        outs = self.model.session.run(None, self.model.feed(tokens, step, cond, sampling))
        out = dict(zip(self.model.outputs, outs))
        self.value = out["cond_next"]
        return out

    def keep(self, rows: np.ndarray) -> None:
        if not rows.all():
            self.value = self.value[rows]


class _DeviceCond:
    """``cond`` kept on the GPU with IO binding: only tokens, step (and row indices) go up and only the
    per-position outputs the selectors read (logits, gate, critic) come down.

    With a ``cond_rows`` graph (``imadarem export --device-state``, the default for ``--fp16``) the state
    never leaves the GPU: the graph picks the active rows and positions. Without it, the state stays there
    while the active batch and length are unchanged, and makes one round trip when they change.
    """

    def __init__(self, model: RefineFile, n: int, length: int):
        import onnxruntime as ort

        self.ort, self.model = ort, model
        self.value = ort.OrtValue.ortvalue_from_numpy(np.zeros((n, length, model.hidden_size), dtype=np.float32),
                                                      "cuda", 0)
        self.rows = np.arange(n, dtype=np.int64)
        self.in_graph = model.device_state

    def run(self, tokens: np.ndarray, step: np.ndarray, sampling: tuple | None = None) -> dict[str, Any]:
        """Outputs as host arrays, except ``logits`` of a sampling-head step: an OrtValue on the GPU (read
        only if a selector asks for the full distribution)."""
        b, cut = tokens.shape
        binding = self.model.session.io_binding()
        binding.bind_cpu_input("tokens", tokens)
        binding.bind_cpu_input("step", step)
        on_device = {"cond_next"}
        if sampling is not None:
            for name, value in zip(SAMPLING_INPUTS, sampling):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            on_device.add("logits")
        if self.in_graph:
            binding.bind_ortvalue_input("cond", self.value)
            binding.bind_cpu_input("cond_rows", self.rows)
        else:
            shape = self.value.shape()
            if shape[0] != b or shape[1] != cut:  # rows left or padding trimmed: one round trip
                host = self.value.numpy()[self.rows][:, :cut]
                self.value = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(host), "cuda", 0)
            binding.bind_ortvalue_input("cond", self.value)
        for name in self.model.outputs:
            binding.bind_output(name, "cuda" if name in on_device else "cpu")
        self.model.session.run_with_iobinding(binding)
        values = dict(zip(self.model.outputs, binding.get_outputs()))
        self.value = values.pop("cond_next")
        self.rows = np.arange(b, dtype=np.int64)
        return {name: v if name in on_device else v.numpy() for name, v in values.items()}

    def keep(self, rows: np.ndarray) -> None:
        self.rows = self.rows[rows]


class _LazyLogits:
    """The banned logits of a step whose sampling ran in the graph, fetched (from the GPU, if that is
    where they are) and widened only when a selector reads ``state.logits``."""

    def __init__(self, value, length: int, bias: np.ndarray, first: np.ndarray | None, eos: int | None):
        self.value, self.length, self.bias, self.first, self.eos = value, length, bias, first, eos

    def __call__(self) -> np.ndarray:
        host = self.value if isinstance(self.value, np.ndarray) else self.value.numpy()
        logits = _widen({"logits": host}, self.length)["logits"].copy()
        ban_logits(logits, self.bias, self.first, self.eos)
        return _read_only(logits)


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _widen(out: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Per-position outputs of a trimmed run, zero-filled back to ``length`` for the selector (the filled
    positions are frozen padding: nothing there is ever updated). ``cond_next`` stays trimmed: it is only
    fed back."""
    wide = dict(out)
    for name, value in out.items():
        if name != "cond_next" and isinstance(value, np.ndarray) and value.ndim >= 2 and value.shape[1] < length:
            full = np.zeros((value.shape[0], length, *value.shape[2:]), dtype=value.dtype)
            full[:, : value.shape[1]] = value
            wide[name] = full
    return wide


# -- opening a file ----------------------------------------------------------------------------------
def _last_dim(node) -> int | None:
    shape = node.shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def check_graph(session, config: RefineConfig, path: str, block: int = 0) -> tuple[list[str], list[str]]:
    """The graph's inputs and outputs against the contract and the config (``block``: the model's decoding
    block, 0 for none); their names."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    for name in INPUTS:
        if name not in inputs:
            raise ModelFileError(f"{path}: graph has no input {name!r} (has: {', '.join(inputs)})")
    for name in OUTPUTS:
        if name not in outputs:
            raise ModelFileError(f"{path}: graph has no output {name!r} (has: {', '.join(outputs)})")
    for group, ins, outs in (("sampling head", SAMPLING_INPUTS, SAMPLING_OUTPUTS),
                             ("verifier", VERIFY_INPUTS, VERIFY_OUTPUTS), ("packed-state input", PACKED_INPUTS, ())):
        present = [n for n in ins if n in inputs] + [n for n in outs if n in outputs]
        missing = [n for n in ins if n not in inputs] + [n for n in outs if n not in outputs]
        if present and missing:
            raise ModelFileError(f"{path}: graph has a partial {group} (missing {', '.join(missing)})")
    for name, what in (("draft_noise", "a verifier"), ("attend", "packed-state inputs")):
        if name in inputs and not block:
            raise ModelFileError(f"{path}: graph has {what} but its config is not a block model's")
    if "attend" in inputs and "draft_noise" in inputs:
        raise ModelFileError(f"{path}: graph has both a verifier and packed-state inputs; a file has one or neither")
    for name, dtype in {**INPUT_TYPES, **OPTIONAL_INPUT_TYPES}.items():
        if name in inputs and inputs[name].type != dtype:
            raise ModelFileError(f"{path}: input {name!r} is {inputs[name].type}, expected {dtype}")
    for node, want, what in ((inputs["cond"], config.hidden_size, "hidden_size"),
                             (outputs["cond_next"], config.hidden_size, "hidden_size"),
                             (outputs["logits"], config.vocab_size, "vocab_size")):
        got = _last_dim(node)
        if got is not None and got != want:
            raise ModelFileError(f"{path}: {node.name!r} has last dimension {got} but the config says {what} {want}")
    return list(inputs), list(outputs)


def probe(model: RefineFile) -> None:
    """One step on one all-mask row of ``max_seq_len`` positions: a graph that contradicts its metadata (a
    position table shorter than ``max_seq_len``, a wrong vocabulary) fails here, not mid-run."""
    length, vocab = model.max_seq_len, model.vocab_size
    tokens = np.full((1, length), model.special.mask, dtype=np.int64)
    feed = model.feed(tokens, np.zeros(1, np.int64), np.zeros((1, length, model.hidden_size), np.float32))
    try:
        logits = model.session.run(["logits"], feed)[0]
    except Exception as exc:
        raise run_failure(model.path, f"the graph cannot run one step at the config's max_seq_len {length}",
                          exc) from None
    if logits.shape != (1, length, vocab):
        raise ModelFileError(f"{model.path}: one step at max_seq_len {length} gave logits of shape "
                             f"{list(logits.shape)}; the config says [1, {length}, {vocab}]")


def open_file(path: str, session, meta: dict[str, str], provider: str = "cpu", threads: int | None = None) -> RefineFile:
    common = check_metadata(meta, path, FORMAT, RefineConfig.from_dict)
    inputs, outputs = check_graph(session, common.typed, path, decode_block(common.config))
    model = RefineFile(path, session, meta, common, provider, threads, {"inputs": inputs, "outputs": outputs})
    probe(model)
    return model


SPEC = Format("refine", matches, open_file, "a bidirectional refinement step with self-conditioning (format 1)")
