"""Decode files (model format 2, config ``"graph": "decode"``): the gate selector's draft-and-verify loop,
or the plain left-to-right decoder, with every step inside one ONNX graph (docs/ARCHITECTURE.md,
"Decode files"; written by ``imadarem export-causal --decode``).

A call of the graph takes the decoding state and returns the next one: the fed tokens and their start
position, the committed ids, which rows are done, calls per row, and the per-layer KV caches of fixed
size; per batch it also takes each sample's counter key and the temperature. All the runtime does is
feed the state back until no row is active:

- on the CPU, with ``session.run``;
- on CUDA, with two sets of device buffers bound alternately as inputs and outputs (IO binding: nothing
  leaves the GPU but one int64 per call, the count of active rows), and the call captured once per batch
  size and direction as a CUDA graph (``enable_cuda_graph``, selected per run with ``gpu_graph_id``, as
  onnxruntime-genai does), so a call costs one graph launch. A batch is padded to a size bucket (a power
  of two, or the request's ``batch_size``) whose padding rows start done and cost nothing but their
  share of the fixed-shape call.

The molecules are those of the host loop with the gate selector and of the left-to-right decoder for the
same seed (every exact token is drawn with the noise of its sample and position, ``rules.counter_gumbel``),
up to the rounding of the file's precision.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.causal import CausalConfig, blank_bans
from imadarem.runtime.errors import ModelFileError
from imadarem.runtime.generator import LoopTimings, Sample, plain_request
from imadarem.runtime.modelfile import CAUSAL_FORMAT, KEY_CONFIG, check_metadata, checked_fields, open_session
from imadarem.runtime.randomness import SampleStreams

STATE = ("fed", "start", "ids", "done", "calls")
CONSTANTS = ("keys", "temperature")
#: metadata: what the first call would compute from BOS (the same for every molecule), so that decoding
#: starts after it: {"logits": [V], "drafts": [D][V], "kv": [layers][2][hidden]}
KEY_START = "imadarem.decode_start"


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


def is_decode(meta: dict[str, str]) -> bool:
    """A format-2 file whose graph is a decode graph (its config says ``"graph": "decode"``)."""
    from imadarem.runtime.modelfile import KEY_FORMAT

    if meta.get(KEY_FORMAT) != CAUSAL_FORMAT:
        return False
    try:
        return json.loads(meta.get(KEY_CONFIG, "{}")).get("graph") == "decode"
    except (ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class DecodeConfig(CausalConfig):
    """The typed view of a decode file's config: the causal config, plus the cache's slots."""

    cache_len: int = 0

    @classmethod
    def from_dict(cls, config: dict[str, Any], path: str = "model") -> DecodeConfig:
        base = CausalConfig.from_dict(config, path)  # "kind" and heads, checked once
        slots = checked_fields(cls, config, path)["cache_len"]
        if slots != base.max_seq_len + 1 + base.num_drafts:
            raise ModelFileError(f"{path}: model config cache_len {slots} is not max_seq_len + 1 + num_drafts "
                                 f"({base.max_seq_len + 1 + base.num_drafts})")
        return cls(**{**vars(base), "cache_len": slots})


def cache_names(num_layers: int) -> list[str]:
    return [f"cache_{kv}{i}" for i in range(num_layers) for kv in ("k", "v")]


@dataclass
class DecodeModelFile:
    path: str
    session: Any
    config: dict[str, Any]
    typed: DecodeConfig
    tokenizer: Any
    special: Any
    provenance: dict[str, Any]
    metadata: dict[str, str]
    cache_type: str  # the caches' element type, "tensor(float)" or "tensor(float16)"
    start: dict[str, np.ndarray]  # KEY_START's arrays: logits [V], drafts [D, V], kv [layers, 2, hidden]

    decode = True

    @property
    def state_names(self) -> list[str]:
        return list(STATE) + cache_names(self.typed.num_layers)

    @cached_property
    def cache_dtype(self):
        return np.float16 if self.cache_type == "tensor(float16)" else np.float32

    @cached_property
    def bias(self) -> tuple[np.ndarray, np.ndarray]:
        c = self.typed
        return blank_bans(self.tokenizer, self.special, c.vocab_size, c.max_seq_len)

    def initial_state(self, keys: np.ndarray, temperature: float, padding: np.ndarray | None = None,
                      caches: bool = True) -> dict[str, np.ndarray]:
        """The state after BOS for one row per key: the first token and drafts drawn with each sample's
        noise from the file's ``start`` outputs (``start_tokens``), BOS's keys and values in cache slot 0
        (``caches`` False leaves the caches out: on a GPU slot 0 is written once per session and never
        again). Rows marked ``padding`` start done."""
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
        """The state before BOS, whose call the graph then runs itself (and writes cache slot 0): what a
        GPU starts a large batch from, where one more call costs less than drawing every row's first
        tokens on the host. Rows marked ``padding`` start done."""
        c, sp = self.typed, self.special
        b = padding.shape[0]
        fed = np.full((b, c.num_drafts + 1), sp.pad, np.int64)
        fed[:, 0] = sp.mask  # BOS; the PAD drafts are never right
        state = {"fed": fed, "start": np.zeros(b, np.int64), "ids": np.full((b, c.max_seq_len), sp.pad, np.int64),
                 "done": padding.astype(bool), "calls": np.zeros(b, np.int64)}
        if caches:
            state.update(self._caches(b))
        return state

    def start_state(self, keys: np.ndarray, temperature: float, padding: np.ndarray, from_bos: bool,
                    caches: bool = True) -> dict[str, np.ndarray]:
        """``bos_state`` or ``initial_state`` (after BOS, first tokens drawn here): the same molecules."""
        if from_bos:
            return self.bos_state(padding, caches)
        return self.initial_state(keys, temperature, padding, caches)


#: on CUDA a batch bucket of at least this many rows starts from BOS on the GPU: the host's draw of every
#: row's first tokens (the counter hash over [rows, drafts + 1, vocab] in numpy) cost more than the extra
#: call from 256 rows on (an H200 and its host: 10-16% of the wall time at 1024-4096 rows, BENCH-NOTES.md)
GPU_START_ROWS = 256


def load_decode_file(path: str, provider: str = "cpu", threads: int | None = None,
                     opened: tuple | None = None) -> DecodeModelFile:
    """Open and check a decode file: metadata, the graph's inputs and outputs, and one probe call."""
    path = str(path)
    session, meta = opened or open_session(path, provider, threads)
    config, tokenizer, special, provenance = check_metadata(meta, path, DecodeConfig, CAUSAL_FORMAT)
    typed = DecodeConfig.from_dict(config, path)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    state = list(STATE) + cache_names(typed.num_layers)
    want_in, want_out = state + list(CONSTANTS), [f"{n}_next" for n in state] + ["active"]
    missing = [n for n in want_in if n not in inputs] + [n for n in want_out if n not in outputs]
    if missing:
        raise ModelFileError(f"{path}: a decode graph needs the inputs {', '.join(want_in)} and the outputs "
                             f"{', '.join(want_out)} (missing {', '.join(missing)})")
    model = DecodeModelFile(path, session, config, typed, tokenizer, special, provenance, meta,
                            inputs["cache_k0"].type, _start_outputs(meta, typed, path))
    probe = model.initial_state(np.zeros(1, np.int64), 1.0)
    try:
        out = session.run(["fed_next", "ids_next", "active"],
                          {**probe, "keys": np.zeros(1, np.int64), "temperature": np.ones(1, np.float32)})
    except Exception as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelFileError(f"{path}: the decode graph does not run with its config (onnxruntime: "
                             f"...{detail[-120:]})") from None
    if out[0].shape != (1, typed.num_drafts + 1) or out[1].shape != (1, typed.max_seq_len):
        raise ModelFileError(f"{path}: the probe call gave fed_next {list(out[0].shape)} and ids_next "
                             f"{list(out[1].shape)}; the config says [1, {typed.num_drafts + 1}] and "
                             f"[1, {typed.max_seq_len}]")
    return model


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


class DecodeGenerator:
    """Generate with a decode file: the state goes round the graph until every row is done."""

    def __init__(self, model_path, provider: str = "cpu", threads: int | None = None, opened: tuple | None = None,
                 cuda_graphs: bool = True):
        self._attach(load_decode_file(str(model_path), provider, threads, opened), provider, threads, cuda_graphs)

    @classmethod
    def from_model_file(cls, model: DecodeModelFile, provider: str = "cpu", threads: int | None = None,
                        cuda_graphs: bool = True) -> DecodeGenerator:
        gen = cls.__new__(cls)
        gen._attach(model, provider, threads, cuda_graphs)
        return gen

    def _attach(self, model: DecodeModelFile, provider: str, threads: int | None, cuda_graphs: bool) -> None:
        self.provider, self.threads, self.model = provider, threads, model
        self.config, self.model_config = model.config, model.typed
        self.tokenizer, self.special = model.tokenizer, model.special
        #: capture each call as a CUDA graph (off: the same IO binding, kernels launched one by one)
        self.cuda_graphs = cuda_graphs
        #: batches of at least this many rows start from BOS, whose call the graph runs (None: never; the
        #: host draws the first tokens); the same molecules either way, one call more per molecule
        self.graph_start_rows = GPU_START_ROWS if provider == "cuda" else None
        self._cuda: dict[int, _CudaGraphs] = {}

    def generate(self, n: int = 1, **kwargs: Any) -> list[Sample]:
        return list(self.iter_generate(n, **kwargs))

    def iter_generate(self, n: int = 1, temperature: float | None = None, seed: int | None = None,
                      batch_size: int | None = None, timings: LoopTimings | None = None,
                      decode: bool = True) -> Iterator[Sample]:
        """The samples, batch by batch (as ``Generator.iter_generate``)."""
        batches = self.iter_arrays(n, temperature, seed, batch_size, timings)
        return (sample for ids, calls in batches for sample in self._samples(ids, calls, decode))

    def iter_arrays(self, n: int = 1, temperature: float | None = None, seed: int | None = None,
                    batch_size: int | None = None, timings: LoopTimings | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The loop's own output, batch by batch: ids [b, max_seq_len] (PAD after EOS) and calls [b], as
        the PyTorch loop returns them. ``timings`` covers the loop: the start state, the calls and reading
        the ids back, not building ``Sample`` objects from them."""
        n, temp, batch, root = plain_request(n, temperature, seed, batch_size, self.model_config.sampling_temperature)
        return self._batches(n, batch, root, temp, timings)

    def _batches(self, n, batch, root, temp, timings) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for first in range(0, n, batch):
            started = time.perf_counter()
            size = min(batch, n - first)
            keys = SampleStreams(root, first, size).keys()
            if self.provider == "cuda":
                ids, calls = self._cuda_run(keys, temp, batch, timings)
            else:
                ids, calls = self._host_run(keys, temp, timings)
            if timings is not None:
                timings.total_seconds += time.perf_counter() - started
            yield ids, calls

    # -- the CPU: session.run, the state fed back as numpy arrays ------------------------------------
    def _host_run(self, keys: np.ndarray, temp: float, timings: LoopTimings | None):
        model = self.model
        names = model.state_names
        outputs = [f"{n}_next" for n in names] + ["active"]
        state = model.start_state(keys, temp, np.zeros(keys.shape[0], bool), self._from_bos(keys.shape[0]))
        constants = {"keys": keys, "temperature": np.array([temp], np.float32)}
        active = int((~state["done"]).sum())
        for _ in range(model.typed.max_seq_len if active else 0):
            started = time.perf_counter()
            out = model.session.run(outputs, {**state, **constants})
            seconds = time.perf_counter() - started
            state = dict(zip(names, out[:-1]))
            self._time(timings, started, seconds, active)
            active = int(out[-1][0])
            if not active:
                break
        return state["ids"], state["calls"]

    # -- CUDA: device buffers bound in turn as inputs and outputs, one CUDA graph per direction ------
    def _cuda_run(self, keys: np.ndarray, temp: float, batch: int, timings: LoopTimings | None):
        bucket = batch if keys.shape[0] == batch else _bucket(keys.shape[0])
        graphs = self._cuda.get(bucket)
        if graphs is None:
            graphs = self._cuda[bucket] = _CudaGraphs(self.model, bucket, self.threads, self.cuda_graphs)
        return graphs.run(keys, temp, timings, self._time, self._from_bos(bucket))

    def _from_bos(self, rows: int) -> bool:
        return self.graph_start_rows is not None and rows >= self.graph_start_rows

    @staticmethod
    def _time(timings: LoopTimings | None, started: float, run_seconds: float, rows: int) -> None:
        if timings is None:
            return
        timings.step_seconds.append(time.perf_counter() - started)
        timings.run_seconds.append(run_seconds)
        timings.active_rows.append(rows)
        timings.run_lengths.append(0)

    def _samples(self, ids: np.ndarray, calls: np.ndarray, decode: bool) -> list[Sample]:
        """Each row up to and including its first EOS (or without its trailing padding), as Samples; the
        lengths in one numpy pass (this runs once per batch, between GPU batches)."""
        eos, pad = self.special.eos, self.special.pad
        L = ids.shape[1]
        filled = ids != pad
        ends = np.where(filled.any(1), L - np.argmax(filled[:, ::-1], 1), 0)
        if eos is not None:
            is_eos = ids == eos
            ends = np.where(is_eos.any(1), is_eos.argmax(1) + 1, ends)
        rows, counts, lengths = ids.tolist(), calls.tolist(), ends.tolist()
        decode_ids = self.tokenizer.decode if decode else None
        out = []
        for row, n, k in zip(rows, lengths, counts):
            kept = row[:n]
            out.append(Sample(decode_ids(kept) if decode_ids else None, kept, k, [], False))
        return out


def _bucket(rows: int) -> int:
    """The fixed batch a CUDA graph is captured for: the next power of two."""
    return 1 << max(0, int(rows - 1).bit_length())


class _CudaGraphs:
    """One session of a decode file for a fixed batch (``add_free_dimension_override_by_name``: every
    shape static, so onnxruntime places every node on the GPU and may capture it), two sets of device
    buffers A and B, and two IO bindings: A -> B (graph 1) and B -> A (graph 2). Between calls nothing is
    copied; the host reads one int64, the number of rows still active."""

    def __init__(self, model: DecodeModelFile, batch: int, threads: int | None, graphs: bool = True):
        from imadarem.runtime.modelfile import import_onnxruntime, providers_for, session_options

        ort = import_onnxruntime()
        self.ort, self.model, self.batch = ort, model, batch
        options = session_options(threads or 1)  # the CPU runs nothing of the graph: no spinning thread pool
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_free_dimension_override_by_name("batch", batch)
        provider_options = [{"enable_cuda_graph": "1" if graphs else "0"}, {}]
        self.session = ort.InferenceSession(model.path, sess_options=options, providers=providers_for("cuda"),
                                            provider_options=provider_options)
        names = model.state_names
        first = model.initial_state(np.zeros(batch, np.int64), 1.0)  # BOS in cache slot 0, for good
        self.buffers = [{n: ort.OrtValue.ortvalue_from_numpy(first[n], "cuda", 0) for n in names} for _ in range(2)]
        self.keys = ort.OrtValue.ortvalue_from_numpy(np.zeros(batch, np.int64), "cuda", 0)
        self.temperature = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.float32), "cuda", 0)
        self.active = [ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int64), "cuda", 0) for _ in range(2)]
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
            options = ort.RunOptions()
            if graphs:
                options.add_run_config_entry("gpu_graph_id", str(direction + 1))
            self.bindings.append(binding)
            self.run_options.append(options)

    def run(self, keys: np.ndarray, temp: float, timings, record, from_bos: bool):
        rows = keys.shape[0]
        padded = np.zeros(self.batch, np.int64)
        padded[:rows] = keys
        start = self.model.start_state(padded, temp, np.arange(self.batch) >= rows, from_bos, caches=False)
        for name, value in start.items():  # in place: the captured graphs keep these addresses
            self.buffers[0][name].update_inplace(value)  # (stale cache slots past 0 are written before read)
        self.keys.update_inplace(padded)
        self.temperature.update_inplace(np.array([temp], np.float32))
        direction, active = 0, int((~start["done"]).sum())
        for _ in range(self.model.typed.max_seq_len if active else 0):
            started = time.perf_counter()
            self.session.run_with_iobinding(self.bindings[direction], self.run_options[direction])
            seconds = time.perf_counter() - started
            record(timings, started, seconds, active)
            active = int(self.active[direction].numpy()[0])
            direction = 1 - direction
            if not active:
                break
        final = self.buffers[direction]
        return final["ids"].numpy()[:rows], final["calls"].numpy()[:rows]


__all__ = ["DecodeGenerator", "DecodeModelFile", "is_decode", "load_decode_file"]
