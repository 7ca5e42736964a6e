"""Decode files (format 2, config ``"graph": "decode"``): the gate selector's whole draft-and-verify step,
or one left-to-right step, inside one graph (written by ``imadarem export --decode``).

**Contract.** Config: :class:`DecodeConfig` (the causal config plus ``cache_len`` = max_seq_len + 1 + D
and ``"graph": "decode"``). State inputs ``fed`` int64 [B, D+1] (the newest exact token and D drafts),
``start`` int64 [B] (their first model position), ``ids`` int64 [B, L] (committed tokens, PAD beyond),
``done`` bool [B], ``calls`` int64 [B] and per layer ``cache_k{i}`` / ``cache_v{i}`` [B, heads, cache_len,
head_dim] (slot = model position; float32, or float16 in an fp16 file), each returned as ``<name>_next``;
per batch ``keys`` int64 [B] (each sample's counter key) and ``temperature`` float32 [1]; output
``active`` int64 [1], the rows still decoding. Every dimension but the batch is fixed. Metadata
``imadarem.decode_start`` holds what the BOS call computes, the same for every molecule (first-token and
draft logits, BOS's keys and values), so a row can start after BOS.

**Decoding** (:class:`DecodePlan`): feed the state back until no row is active. On the CPU with
``session.run``, the first tokens drawn on the host with each row's noise (``start_tokens``). On CUDA per
batch bucket (a power of two, or the request's batch size) one session with the batch fixed, two sets of
device buffers for the small state bound alternately as inputs and outputs and one per cache bound as both
(IO binding: between calls one int64 comes back), and one captured CUDA graph per direction (``gpu_graph_id``
1 and 2); buckets of ``GPU_START_ROWS`` rows or more run the BOS call on the GPU instead of drawing the
first tokens on the host. Padding rows start done. The molecules are the causal step's for the same seed: every exact token is drawn with the noise of
its sample and position. A decode file takes no selector but ``gate``, no prompt, step budget or trajectory,
and only its own number of drafts: each is refused in one line.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.bans import blank_bans
from imadarem.runtime.errors import ImadaremError, ModelFileError
from imadarem.runtime.formats.base import Format, ModelFile
from imadarem.runtime.formats.causal import FORMAT, CausalConfig
from imadarem.runtime.metadata import KEY_FORMAT, check_metadata, checked_fields, config_of
from imadarem.runtime.randomness import SampleStreams
from imadarem.runtime.request import Request
from imadarem.runtime.results import BatchResult, CallReport
from imadarem.runtime.session import import_onnxruntime, providers_for, run_failure, session_options
from imadarem.runtime.strategy import Decoding, Plan

GRAPH = "decode"
STATE = ("fed", "start", "ids", "done", "calls")
CONSTANTS = ("keys", "temperature")
#: metadata: what the first call would compute from BOS (the same for every molecule), so that decoding
#: starts after it: {"logits": [V], "drafts": [D][V], "kv": [layers][2][hidden]}
KEY_START = "imadarem.decode_start"
#: on CUDA a batch bucket of at least this many rows starts from BOS on the GPU: the host's draw of every
#: row's first tokens (the counter hash over [rows, drafts + 1, vocab] in numpy) cost more than the extra
#: call from 256 rows on (an H200 and its host: 10-16% of the wall time at 1024-4096 rows)
GPU_START_ROWS = 256


def cache_names(num_layers: int) -> list[str]:
    return [f"cache_{kv}{i}" for i in range(num_layers) for kv in ("k", "v")]


def state_names(num_layers: int) -> list[str]:
    """The state inputs, in order (each comes back as ``<name>_next``)."""
    return list(STATE) + cache_names(num_layers)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in order."""
    state = state_names(num_layers)
    return state + list(CONSTANTS), [f"{n}_next" for n in state] + ["active"]


@dataclass(frozen=True)
class DecodeConfig(CausalConfig):
    """The typed view of a decode file's config: the causal config, plus the cache's slots."""

    cache_len: int = field(default=0, metadata={"max": 1 << 16})

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "graph": GRAPH}

    @classmethod
    def from_dict(cls, config: dict[str, Any], path: str = "model") -> DecodeConfig:
        base = CausalConfig.from_dict(config, path)  # "kind" and heads, checked once
        slots = checked_fields(cls, config, path)["cache_len"]
        if slots != base.max_seq_len + 1 + base.num_drafts:
            raise ModelFileError(f"{path}: model config cache_len {slots} is not max_seq_len + 1 + num_drafts "
                                 f"({base.max_seq_len + 1 + base.num_drafts})")
        return cls(**{**asdict(base), "cache_len": slots})


def matches(meta: dict[str, str]) -> bool:
    return meta.get(KEY_FORMAT) == FORMAT and (config_of(meta) or {}).get("graph") == GRAPH


def start_tokens(logits, drafts, keys, temperature, bias, draft_bias, eos):
    """Each sample's first token (ids index 0) and first D drafts (1 .. D) from the logits after BOS,
    drawn with its counter noise: what a decode graph's first call would draw (numpy or torch)."""
    D, V = drafts.shape[0], logits.shape[-1]
    positions = keys[:, None] * 0 + rules._positions(keys, D + 1)[None, :]
    noise = rules.counter_gumbel(keys, positions, V)
    first = rules.coupled_sample(logits + bias, temperature, noise[:, 0])
    guesses = rules.coupled_sample(drafts + draft_bias, temperature, noise[:, 1:])
    done = first == eos if eos is not None else first < 0
    return first, guesses, done


class DecodeFile(ModelFile):
    """A checked decode file."""

    format_name = "decode"
    outputs: list[str] = []
    #: on CUDA, capture each call as a CUDA graph (off: the same IO binding, kernels launched one by one)
    cuda_graphs = True

    @property
    def start(self) -> dict[str, np.ndarray]:
        """``imadarem.decode_start``'s arrays: logits [V], drafts [D, V], kv [layers, 2, hidden]."""
        return self.extra["start"]

    @property
    def state_names(self) -> list[str]:
        return state_names(self.typed.num_layers)

    @cached_property
    def cache_dtype(self):
        return np.float16 if self.extra["cache_type"] == "tensor(float16)" else np.float32

    @cached_property
    def bias(self) -> tuple[np.ndarray, np.ndarray]:
        c = self.typed
        return blank_bans(self.tokenizer, self.special, c.vocab_size, c.max_seq_len)

    @cached_property
    def graph_start_rows(self) -> int | None:
        """Batches of at least this many rows start from BOS, whose call the graph runs (None: never; the
        host draws the first tokens); the same molecules either way, one call more per molecule."""
        return GPU_START_ROWS if self.provider == "cuda" else None

    def plan(self, request: Request) -> Plan:
        name = getattr(request.selector, "name", request.selector)
        drafts = self.typed.num_drafts
        asked = request.asked(**{
            f"--selector {name}": name not in (None, "gate"), "--steps": request.steps is not None,
            "--stop-threshold": request.stop_threshold is not None, "--prompt": request.prompt is not None,
            "--trajectory": request.trajectory, "selector options": bool(request.selector_options),
            f"--drafts {request.drafts} (it drafts {drafts})": request.drafts not in (None, drafts)})
        if asked:
            raise ImadaremError(f"{self.name} is a decode file: its graph runs the gate selector's draft-and-verify "
                                f"loop itself, so it takes no {', '.join(asked)} (use the step file it was exported "
                                "from for those)")
        temp = self.typed.sampling_temperature if request.temperature is None else request.temperature
        return DecodePlan(self, temp, request.batch_size)

    # -- the state --------------------------------------------------------------------------------
    def initial_state(self, keys: np.ndarray, temperature: float, padding: np.ndarray | None = None,
                      caches: bool = True) -> dict[str, np.ndarray]:
        """The state after BOS for one row per key: the first token and drafts drawn with each sample's
        noise from the file's ``start`` outputs, BOS's keys and values in cache slot 0 (``caches`` False
        leaves the caches out: on a GPU slot 0 is written once per session). Rows marked ``padding``
        start done."""
        c, sp, start = self.typed, self.special, self.start
        b = keys.shape[0]
        first, guesses, done = start_tokens(start["logits"], start["drafts"], keys, temperature, *self.bias, sp.eos)
        ids = np.full((b, c.max_seq_len), sp.pad, np.int64)
        ids[:, 0] = first
        state = {"fed": np.concatenate([first[:, None], guesses], 1).astype(np.int64),
                 "start": np.ones(b, np.int64), "ids": ids,
                 "done": done if padding is None else done | padding.astype(bool),
                 "calls": np.zeros(b, np.int64)}
        if caches:
            state.update(self._caches(b))
            for i in range(c.num_layers):
                for j, kv in enumerate("kv"):
                    state[f"cache_{kv}{i}"][:, :, 0] = start["kv"][i, j].reshape(c.num_heads, c.head_dim)
        return state

    def _caches(self, b: int) -> dict[str, np.ndarray]:
        c = self.typed
        return {name: np.zeros((b, c.num_heads, c.cache_len, c.head_dim), dtype=self.cache_dtype)
                for name in cache_names(c.num_layers)}

    def bos_state(self, padding: np.ndarray, caches: bool = True) -> dict[str, np.ndarray]:
        """The state before BOS, whose call the graph then runs itself (and writes cache slot 0). Rows
        marked ``padding`` start done."""
        c, sp = self.typed, self.special
        b = padding.shape[0]
        fed = np.full((b, c.num_drafts + 1), sp.pad, np.int64)
        fed[:, 0] = sp.mask  # BOS; the PAD drafts are never right
        state = {"fed": fed, "start": np.zeros(b, np.int64), "ids": np.full((b, c.max_seq_len), sp.pad, np.int64),
                 "done": padding.astype(bool), "calls": np.zeros(b, np.int64)}
        if caches:
            state.update(self._caches(b))
        return state

    def start_state(self, keys: np.ndarray, temperature: float, padding: np.ndarray, caches: bool = True,
                    bucket: int | None = None) -> dict[str, np.ndarray]:
        """``bos_state`` for large enough GPU buckets (``bucket`` rows, default as many as ``keys``), else
        ``initial_state``: the same molecules."""
        rows = padding.shape[0] if bucket is None else bucket
        if self.graph_start_rows is not None and rows >= self.graph_start_rows:
            return self.bos_state(padding, caches)
        return self.initial_state(keys, temperature, padding, caches)

    @cached_property
    def cuda_buckets(self) -> dict[tuple[int, bool], _CudaGraphs]:
        """Per (batch bucket, CUDA graphs on): its session, buffers and bindings, made on first use."""
        return {}


class DecodePlan(Plan):
    def __init__(self, model: DecodeFile, temperature: float, batch: int):
        self.model, self.temperature, self.batch = model, temperature, batch

    def start(self, size: int, streams: SampleStreams) -> Decoding:
        keys = streams.keys()
        if self.model.provider != "cuda":
            return HostDecoding(self.model, keys, self.temperature)
        bucket = self.batch if size == self.batch else _bucket(size)
        key = (bucket, self.model.cuda_graphs)
        graphs = self.model.cuda_buckets.get(key)
        if graphs is None:
            graphs = self.model.cuda_buckets[key] = _CudaGraphs(self.model, bucket, self.model.threads,
                                                                 self.model.cuda_graphs)
        return graphs.decoding(keys, self.temperature)


class HostDecoding(Decoding):
    """The CPU: one IO binding a call, the KV caches written in place.

    Why in place: the graph writes each call's keys and values into its caches with ScatterND, whose
    output onnxruntime would otherwise allocate and fill with a copy of the whole cache first (at batch 64
    with the bundled model, 53% of the kernel time went to that copy). Bound to the input's own buffer, the
    kernel only scatters the new slots: the same molecules (tested against ``session.run``), 1.2-1.4x faster
    at batch 64 (docs/bench-notes.md). The small state (fed tokens, ids, counters) goes up and down as numpy.
    ``in_place`` off runs the plain ``session.run`` (a test compares the two)."""

    in_place = True
    refills = True  # in-flight batching: a row's state is its own (slot 0, BOS, is the same for every row)

    def __init__(self, model: DecodeFile, keys: np.ndarray, temperature: float):
        self.model, self.temperature = model, temperature
        self.names = model.state_names
        self.outputs = [f"{n}_next" for n in self.names] + ["active"]
        self.state = model.start_state(keys, temperature, np.zeros(keys.shape[0], bool))
        self.constants = {"keys": np.array(keys, np.int64), "temperature": np.array([temperature], np.float32)}
        self.idle = np.zeros(keys.shape[0], bool)  # rows taken and not restarted
        self.caches: dict[str, Any] = {}
        if self.in_place:
            ort = import_onnxruntime()
            for name in cache_names(model.typed.num_layers):
                self.caches[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self.state.pop(name)))
        self.small = [n for n in self.names if n not in self.caches]  # the state that goes up and down as numpy

    def _ended(self) -> np.ndarray:
        """Rows whose sample ended: done, or (a safety net) as many calls as tokens."""
        return self.state["done"] | (self.state["calls"] >= self.model.typed.max_seq_len)

    @property
    def active(self) -> int:
        return int((~(self._ended() | self.idle)).sum())

    def step(self) -> CallReport:
        rows = self.active
        started = time.perf_counter()
        if self.caches:
            out = self._bound_run()
        else:
            out = self.model.session.run(self.outputs, {**self.state, **self.constants})
        seconds = time.perf_counter() - started
        self.state = dict(zip(self.small, out[:-1]))
        return CallReport(rows, seconds, 0)

    def finished(self) -> np.ndarray:
        return np.flatnonzero(self._ended() & ~self.idle)

    def take(self, rows: np.ndarray) -> BatchResult:
        self.idle[rows] = True
        return BatchResult(self.state["ids"][rows], self.state["calls"][rows])

    def restart(self, rows: np.ndarray, streams: SampleStreams) -> None:
        """The new rows' small state as ``start_state`` sets it; their cache slots need nothing: slot 0
        holds BOS for every row, and a slot past it is written by a row's own call before it is read."""
        keys = streams.keys()
        fresh = self.model.start_state(keys, self.temperature, np.zeros(keys.shape[0], bool), caches=False)
        for name in STATE:
            self.state[name] = np.array(self.state[name])  # onnxruntime's outputs may be read-only
            self.state[name][rows] = fresh[name]
        self.constants["keys"][rows] = keys
        self.idle[rows] = False

    def feed(self) -> dict[str, np.ndarray]:
        """A copy of what the next call reads (state, caches, constants): int8 calibration records these."""
        caches = {name: np.array(value.numpy()) for name, value in self.caches.items()}
        return {**self.state, **caches, **self.constants}

    def _bound_run(self) -> list[np.ndarray]:
        """The call with each cache bound as input and output; the other outputs as numpy, in ``names``
        order, then ``active``."""
        binding = self.model.session.io_binding()
        for name in self.names:
            if name in self.caches:
                binding.bind_ortvalue_input(name, self.caches[name])
                binding.bind_ortvalue_output(f"{name}_next", self.caches[name])
            else:
                binding.bind_cpu_input(name, self.state[name])
                binding.bind_output(f"{name}_next", "cpu")
        for name, value in self.constants.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("active", "cpu")
        self.model.session.run_with_iobinding(binding)
        by_name = dict(zip(self.outputs, binding.get_outputs()))  # bound in that order: the state's, then active
        return [by_name[f"{n}_next"].numpy() for n in self.small] + [by_name["active"].numpy()]

    def result(self) -> BatchResult:
        return BatchResult(self.state["ids"], self.state["calls"])


def _bucket(rows: int) -> int:
    """The fixed batch a CUDA graph is captured for: the next power of two."""
    return 1 << max(0, int(rows - 1).bit_length())


class _CudaGraphs:
    """One session of a decode file for a fixed batch (``add_free_dimension_override_by_name``: every
    shape static, so onnxruntime places every node on the GPU and may capture it), two sets of device
    buffers A and B for the small state, and two IO bindings: A -> B (graph 1) and B -> A (graph 2). Between
    calls nothing is copied; the host reads one int64, the number of rows still active.

    The caches are one buffer each, bound as both input and output (``in_place``): onnxruntime's ScatterND
    skips its copy of the input when the two are the same memory, so a call writes only its new slots. With
    two buffers it copied every layer's whole cache every call (1.5 GB read and written at 4,096 rows).
    ``in_place`` is read when a bucket is built (a Generator keeps its buckets)."""

    in_place = True

    def __init__(self, model: DecodeFile, batch: int, threads: int | None, graphs: bool = True,
                 device: str = "cuda"):
        """``device`` "cpu" (tests only: the same buffers and bindings on the CPU, no graphs) lets CI run this
        loop, refills included, without a GPU."""
        ort = import_onnxruntime()
        self.ort, self.model, self.batch = ort, model, batch
        options = session_options(threads or 1)  # the CPU runs nothing of the graph: no spinning thread pool
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_free_dimension_override_by_name("batch", batch)
        graphs = graphs and device == "cuda"
        provider_options = [{"enable_cuda_graph": "1" if graphs else "0"}, {}] if device == "cuda" else [{}]
        self.session = ort.InferenceSession(model.path, sess_options=options, providers=providers_for(device),
                                            provider_options=provider_options)
        names = model.state_names
        first = model.initial_state(np.zeros(batch, np.int64), 1.0)  # BOS in cache slot 0, for good

        def on_device(value: np.ndarray):  # a copy: on the CPU an OrtValue would share the array's memory
            return ort.OrtValue.ortvalue_from_numpy(np.array(value), device, 0)

        shared = set(cache_names(model.typed.num_layers)) if self.in_place else set()
        caches = {n: on_device(first[n]) for n in shared}
        self.buffers = [{n: caches[n] if n in shared else on_device(first[n]) for n in names} for _ in range(2)]
        self.keys = on_device(np.zeros(batch, np.int64))
        self.temperature = on_device(np.ones(1, np.float32))
        self.active = [on_device(np.zeros(1, np.int64)) for _ in range(2)]
        self.bindings, self.run_options = [], []
        for direction in range(2):
            binding = self.session.io_binding()
            src, dst = self.buffers[direction], self.buffers[1 - direction]
            for n in names:
                binding.bind_ortvalue_input(n, src[n])
                binding.bind_ortvalue_output(f"{n}_next", dst[n])
            binding.bind_ortvalue_input("keys", self.keys)
            binding.bind_ortvalue_input("temperature", self.temperature)
            binding.bind_ortvalue_output("active", self.active[direction])
            run_options = ort.RunOptions()
            if graphs:
                run_options.add_run_config_entry("gpu_graph_id", str(direction + 1))
            self.bindings.append(binding)
            self.run_options.append(run_options)

    def decoding(self, keys: np.ndarray, temperature: float) -> CudaDecoding:
        return CudaDecoding(self, keys, temperature)


class CudaDecoding(Decoding):
    """One batch on a bucket's captured graphs: the start state written in place (the captured graphs keep
    these addresses; stale cache slots past 0 are written before they are read), then one replay a call.

    In flight, the host reads the small state back only once an eighth of the bucket's rows (``look_every``)
    have ended since it last looked, or no row is left, or a row could have run out of positions: between
    looks each call returns one int64, as without refills."""

    refills = True
    look_every = 1 / 8

    def __init__(self, graphs: _CudaGraphs, keys: np.ndarray, temperature: float):
        self.g, self.rows, self.temperature = graphs, keys.shape[0], temperature
        self.keys = np.zeros(graphs.batch, np.int64)
        self.keys[: self.rows] = keys
        start = graphs.model.start_state(self.keys, temperature, np.arange(graphs.batch) >= self.rows, caches=False)
        for name, value in start.items():
            graphs.buffers[0][name].update_inplace(value)
        graphs.keys.update_inplace(self.keys)
        graphs.temperature.update_inplace(np.array([temperature], np.float32))
        self.direction, self.left, self.calls = 0, int((~start["done"]).sum()), 0
        self.idle = np.arange(graphs.batch) >= self.rows  # padding rows, and rows taken and not restarted
        self.live = self.rows  # rows not idle: running, or ended and not taken yet
        self.since_look = 0  # calls since the host last read the state
        self.host: dict[str, np.ndarray] = {}  # the small state as last read

    @property
    def active(self) -> int:
        return self.left if self.calls < self.g.model.typed.max_seq_len or self.refilled else 0

    refilled = False  # whether any row restarted: the call cap then holds per row (``finished``)

    def step(self) -> CallReport:
        g, d = self.g, self.direction
        started = time.perf_counter()
        g.session.run_with_iobinding(g.bindings[d], g.run_options[d])
        seconds = time.perf_counter() - started
        rows = self.left
        self.left = int(g.active[d].numpy()[0])
        self.direction, self.calls, self.since_look = 1 - d, self.calls + 1, self.since_look + 1
        return CallReport(rows, seconds, 0)

    def result(self) -> BatchResult:
        final = self.g.buffers[self.direction]
        return BatchResult(final["ids"].numpy()[: self.rows], final["calls"].numpy()[: self.rows])

    def finished(self) -> np.ndarray:
        length = self.g.model.typed.max_seq_len
        ended = self.live - self.left
        if not (self.left == 0 or ended >= max(1, int(self.g.batch * self.look_every)) or self.since_look >= length):
            return np.zeros(0, np.int64)
        current = self.g.buffers[self.direction]
        self.host = {name: current[name].numpy() for name in STATE}
        self.since_look = 0
        return np.flatnonzero((self.host["done"] | (self.host["calls"] >= length)) & ~self.idle)

    def take(self, rows: np.ndarray) -> BatchResult:
        self.idle[rows] = True
        self.live -= rows.size
        cut = rows[~self.host["done"][rows]]  # out of positions but not done (the safety net): stop them
        if cut.size:
            self.host["done"][cut] = True
            self.g.buffers[self.direction]["done"].update_inplace(self.host["done"])
            self.left -= cut.size
        return BatchResult(self.host["ids"][rows], self.host["calls"][rows])

    def restart(self, rows: np.ndarray, streams: SampleStreams) -> None:
        g, keys = self.g, streams.keys()
        fresh = g.model.start_state(keys, self.temperature, np.zeros(keys.shape[0], bool), caches=False,
                                    bucket=g.batch)
        current = g.buffers[self.direction]
        for name in STATE:
            self.host[name][rows] = fresh[name]
            current[name].update_inplace(self.host[name])
        self.keys[rows] = keys
        g.keys.update_inplace(self.keys)
        self.idle[rows] = False
        self.live += rows.size
        self.left += int((~fresh["done"]).sum())
        self.refilled = True


# -- opening a file ----------------------------------------------------------------------------------
def _start_outputs(meta: dict[str, str], typed: DecodeConfig, path: str) -> dict[str, np.ndarray]:
    want = {"logits": (typed.vocab_size,), "drafts": (typed.num_drafts, typed.vocab_size),
            "kv": (typed.num_layers, 2, typed.hidden_size)}
    try:
        raw = json.loads(meta[KEY_START])
        out = {k: np.asarray(raw[k], dtype=np.float32).reshape(shape) for k, shape in want.items()}
    except (KeyError, ValueError, TypeError):
        raise ModelFileError(f"{path}: a decode file needs metadata {KEY_START!r} with logits, drafts and kv of "
                             f"shapes {', '.join(str(list(v)) for v in want.values())}") from None
    if not all(np.isfinite(v).all() for v in out.values()):
        raise ModelFileError(f"{path}: metadata {KEY_START!r} holds a value that is not finite")
    return out


def open_file(path: str, session, meta: dict[str, str], provider: str = "cpu", threads: int | None = None) -> DecodeFile:
    """Check the metadata, the graph's inputs and outputs, and run one probe call."""
    common = check_metadata(meta, path, FORMAT, DecodeConfig.from_dict)
    typed = common.typed
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    want_in, want_out = io_names(typed.num_layers)
    missing = [n for n in want_in if n not in inputs] + [n for n in want_out if n not in outputs]
    if missing:
        raise ModelFileError(f"{path}: a decode graph needs the inputs {', '.join(want_in)} and the outputs "
                             f"{', '.join(want_out)} (missing {', '.join(missing)})")
    model = DecodeFile(path, session, meta, common, provider, threads,
                       {"cache_type": inputs["cache_k0"].type, "start": _start_outputs(meta, typed, path)})
    probe = model.initial_state(np.zeros(1, np.int64), 1.0)
    try:
        out = session.run(["fed_next", "ids_next", "active"],
                          {**probe, "keys": np.zeros(1, np.int64), "temperature": np.ones(1, np.float32)})
    except Exception as exc:
        raise run_failure(path, "the decode graph does not run with its config", exc) from None
    if out[0].shape != (1, typed.num_drafts + 1) or out[1].shape != (1, typed.max_seq_len):
        raise ModelFileError(f"{path}: the probe call gave fed_next {list(out[0].shape)} and ids_next "
                             f"{list(out[1].shape)}; the config says [1, {typed.num_drafts + 1}] and "
                             f"[1, {typed.max_seq_len}]")
    return model


SPEC = Format("decode", matches, open_file,
              "a causal model's whole draft-and-verify step in one graph, fixed shapes but the batch (format 2)")
