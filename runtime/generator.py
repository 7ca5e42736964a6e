"""The refinement loop over one exported step, in numpy + onnxruntime (docs/ARCHITECTURE.md, "The loop").

x starts as all masks (or a prompt layout) and cond as zeros. Each step runs the model once on the
active sequences, samples proposals, lets the selector choose what to update or re-mask, freezes EOS,
and drops sequences whose change ratio fell under ``stop_threshold``. Leftover masks are resolved at
the last step. A Generator holds no per-call state, so one instance serves many threads at once.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.errors import ImadaremError, ModelFileError, PluginError, SelectorError
from imadarem.runtime.limits import DEFAULT_BATCH_SIZE, MAX_STEPS
from imadarem.runtime.modelfile import SAMPLING_INPUTS, ModelFile, default_model_path, load_model_file
from imadarem.runtime.prompt import Layout, blank_layout, parse_prompt
from imadarem.runtime.randomness import SampleStreams
from imadarem.runtime.registry import create_selector, selector_call, selector_label
from imadarem.runtime.selector import Decision, Selector, StepState, decision_problem


@dataclass
class TrajectoryStep:
    t: int
    tokens: list[int]
    refined: list[int]  # positions whose token changed at this step
    remasked: list[int]
    change_ratio: float
    stopped: bool


@dataclass
class Sample:
    """One generated sequence."""

    text: str | None  # None when generate(decode=False) was asked for ids only
    ids: list[int]  # up to and including EOS, without padding
    steps: int
    edits: list[int]  # tokens edited at each step (changed and not turned into padding: rules.edits)
    early_stop: bool
    trajectory: list[TrajectoryStep] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"text": self.text, "ids": self.ids, "steps": self.steps, "edits": self.edits,
               "early_stop": self.early_stop}
        if self.trajectory is not None:
            out["trajectory"] = [vars(s) for s in self.trajectory]
        return out


@dataclass
class LoopTimings:
    """Where a generate() call spends its time, one entry per loop step (for ``imadarem bench``).

    ``run_seconds`` is the time inside ``session.run``; the rest of ``step_seconds`` is the loop's own
    numpy work (sampling, the selector, EOS handling, compaction).
    """

    step_seconds: list[float] = field(default_factory=list)
    run_seconds: list[float] = field(default_factory=list)
    active_rows: list[int] = field(default_factory=list)
    run_lengths: list[int] = field(default_factory=list)  # positions the model ran on
    total_seconds: float = 0.0

    def outside_run_fraction(self) -> float:
        return 1.0 - sum(self.run_seconds) / self.total_seconds if self.total_seconds > 0 else float("nan")


def _positive_int(name: str, value: Any, most: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
    if not ok or (most is not None and value > most):
        bound = f" (at most {most:,})" if most is not None else ""
        raise ImadaremError(f"{name} must be a positive integer{bound}, got {value!r}")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise ImadaremError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def plain_request(n: Any, temperature: Any, seed: Any, batch_size: Any, default_temperature: float
                  ) -> tuple[int, float, int, np.random.SeedSequence]:
    """The checked arguments of a request to a decoder without selectors (``CausalGenerator``,
    ``DecodeGenerator``): n, the temperature, the batch size and the request's seed sequence."""
    n = _positive_int("n", n)
    temp = _temperature(temperature, default_temperature)
    batch = DEFAULT_BATCH_SIZE if batch_size is None else _positive_int("batch_size", batch_size)
    return n, temp, batch, np.random.SeedSequence(_check_seed(seed))


def _temperature(value: Any, default: float) -> float:
    """A request's sampling temperature: the model's default, or a finite number >= 0."""
    temp = default if value is None else _number("temperature", value)
    if not temp >= 0:
        raise ImadaremError(f"temperature must be >= 0, got {value!r}")
    return temp


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ImadaremError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


@dataclass
class _Run:
    """Per-call knobs, resolved from the arguments and the model's config."""

    selector: Selector
    num_steps: int
    temperature: float
    stop_threshold: float
    layout: Layout
    trajectory: bool
    config: dict[str, Any] = field(default_factory=dict)
    decode: bool = True


class _Batch:
    """The loop's bookkeeping for one batch: every row's tokens and frozen mask, which rows are still
    active, and what the result reports (steps used, edits per step, early stop, trajectories)."""

    def __init__(self, tokens: np.ndarray, frozen: np.ndarray, num_steps: int, trajectory: bool):
        n, length = tokens.shape
        self.tokens, self.frozen, self.num_steps = tokens, frozen, num_steps
        self.active = np.arange(n)
        self.steps_used = np.zeros(n, dtype=np.int64)
        self.early = np.zeros(n, dtype=bool)
        self.edits: list[np.ndarray] = []  # per step run: [n] tokens edited, -1 for rows that had left
        self.trajectories: list[list[TrajectoryStep]] | None = [[] for _ in range(n)] if trajectory else None
        self.cut = length  # positions the model runs on

    @classmethod
    def start(cls, n: int, layout: Layout, num_steps: int, trajectory: bool) -> _Batch:
        """All masks (or the prompt's layout) in every row."""
        return cls(np.broadcast_to(layout.ids, (n, layout.length)).copy(),
                   np.broadcast_to(layout.fixed, (n, layout.length)).copy(), num_steps, trajectory)

    def current(self) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[self.active], self.frozen[self.active]

    def trim(self, x: np.ndarray, eos: int | None, enabled: bool) -> np.ndarray | None:
        """Each active row's first EOS (None without an EOS id); with ``enabled``, the model runs only up
        to the last committed EOS of the active rows (exact: what follows is frozen padding that attention
        ignores; non-increasing, since a committed EOS never moves)."""
        if eos is None:
            return None
        first = rules.first_eos(x, eos)
        if enabled:
            self.cut = min(self.cut, int(first.max()) + 1)
        return first

    def record(self, t: int, x, fz, new, new_frozen, changed, remask, ratio, done, special) -> None:
        """Write the step's result for the active rows (and, when asked, each row's trajectory step)."""
        rows = self.active
        self.tokens[rows], self.frozen[rows] = new, new_frozen
        self.steps_used[rows] = t + 1
        step_edits = np.full(self.tokens.shape[0], -1, dtype=np.int64)
        step_edits[rows] = changed
        self.edits.append(step_edits)
        if t < self.num_steps - 1:
            self.early[rows[done]] = True
        if self.trajectories is None:
            return
        refined = (new != x) & ~fz & (new != special.mask) & (new != special.pad)
        for j, row in enumerate(rows):
            self.trajectories[row].append(TrajectoryStep(
                t, new[j].tolist(), np.flatnonzero(refined[j]).tolist(),
                np.flatnonzero(remask[j] & (x[j] != special.mask)).tolist(), float(ratio[j]),
                bool(done[j]) and t < self.num_steps - 1))

    def row_edits(self, i: int) -> list[int]:
        return [int(step[i]) for step in self.edits[: self.steps_used[i]]]

    def compact(self, done: np.ndarray) -> np.ndarray:
        """Drop the finished rows from the active batch; returns the kept-row mask (for the state)."""
        keep = ~done
        self.active = self.active[keep]
        return keep


class Generator:
    """Generate sequences from an Imadarem model file with numpy + onnxruntime."""

    def __init__(self, model_path: str | os.PathLike | None = None, provider: str = "cpu",
                 threads: int | None = None):
        """Open ``model_path`` (default: the bundled model), a refinement step (format 1) or a causal step
        (format 2, run as draft-and-verify: ``runtime/causal_step.py``)."""
        self._attach(_open_any(model_path, provider, threads), provider)

    @classmethod
    def from_model_file(cls, model: ModelFile, provider: str = "cpu") -> Generator:
        """A Generator over an already opened and checked model file."""
        gen = cls.__new__(cls)
        gen._attach(model, provider)
        return gen

    def _attach(self, model: ModelFile, provider: str) -> None:
        self.model = model
        self.provider = provider
        self.config = self.model.config  # the whole config dict, as selectors see it
        #: a decode file runs its own loop (runtime/decode.py); this Generator then checks the request
        self._decoder = None
        if getattr(model, "decode", False):
            from imadarem.runtime.decode import DecodeGenerator

            self._decoder = DecodeGenerator.from_model_file(model, provider)
            self.tokenizer, self.special, self.model_config = model.tokenizer, model.special, model.typed
            return
        self.model_config = self.model.typed_config  # the values the loop reads
        self.tokenizer = self.model.tokenizer
        self.special = self.model.special
        self._banned = banned_ids(self.special, getattr(self.tokenizer, "unk_token_id", None))
        #: run the model only up to the last committed EOS of the active rows (exact: what follows is
        #: frozen padding, which attention ignores); off only to measure what it saves
        self.trim_padding = True
        #: sample and measure uncertainty inside the graph when the model file has the sampling head
        #: (off: the numpy path, e.g. to compare the two)
        self.graph_sampling = True

    # -- public API ----------------------------------------------------------------------------
    def generate(self, n: int = 1, selector: str | Selector = "gate", steps: int | None = None,
                 temperature: float | None = None, stop_threshold: float | None = None,
                 seed: int | None = None, prompt: str | None = None, batch_size: int | None = None,
                 trajectory: bool = False, timings: LoopTimings | None = None, decode: bool = True,
                 **selector_options: Any) -> list[Sample]:
        """Generate ``n`` sequences (a list of :meth:`iter_generate`'s samples); every knob left None
        defaults from the model's config.

        ``timings``, when given, is filled with per-step wall and ``session.run`` times. ``decode=False``
        leaves ``Sample.text`` None (ids only; decoding SELFIES to SMILES costs more than a GPU step).
        """
        return list(self.iter_generate(n, selector, steps, temperature, stop_threshold, seed, prompt, batch_size,
                                       trajectory, timings, decode, **selector_options))

    def iter_generate(self, n: int = 1, selector: str | Selector = "gate", steps: int | None = None,
                      temperature: float | None = None, stop_threshold: float | None = None,
                      seed: int | None = None, prompt: str | None = None, batch_size: int | None = None,
                      trajectory: bool = False, timings: LoopTimings | None = None, decode: bool = True,
                      **selector_options: Any) -> Iterator[Sample]:
        """The samples of :meth:`generate`, yielded batch by batch as each batch finishes.

        Memory is bounded by ``batch_size`` (default ``DEFAULT_BATCH_SIZE``) whatever ``n``. Sample ``i``
        draws only from its own random stream, seeded by ``(seed, i)``: the same seed gives the same
        samples for any ``n`` (a smaller ``n`` gives a prefix) and any ``batch_size``. The arguments are
        checked here, before the first batch runs.
        """
        n = _positive_int("n", n)
        if self._decoder is not None:
            self._check_decode_request(selector, steps, stop_threshold, prompt, trajectory, selector_options)
            return self._decoder.iter_generate(n, temperature=temperature, seed=seed, batch_size=batch_size,
                                               timings=timings, decode=decode)
        run = self._resolve(selector, steps, temperature, stop_threshold, prompt, trajectory, selector_options,
                            decode)
        batch = DEFAULT_BATCH_SIZE if batch_size is None else _positive_int("batch_size", batch_size)
        root = np.random.SeedSequence(_check_seed(seed))
        return self._batches(n, batch, run, root, selector, selector_options, timings)

    def _batches(self, n: int, batch: int, run: _Run, root: np.random.SeedSequence, selector, selector_options,
                 timings: LoopTimings | None) -> Iterator[Sample]:
        for first in range(0, n, batch):
            started = time.perf_counter()
            size = min(batch, n - first)
            if first > 0:  # a fresh selector per batch: selectors may keep per-run state
                run.selector = self._make_selector(selector, selector_options)
            samples = self._refine(size, run, SampleStreams(root, first, size), timings)
            if timings is not None:
                timings.total_seconds += time.perf_counter() - started
            yield from samples

    # -- setup ---------------------------------------------------------------------------------
    def _check_decode_request(self, selector, steps, stop_threshold, prompt, trajectory, options) -> None:
        """A decode file runs draft-and-verify (the gate selector) inside its graph, with no knob but the
        temperature, the seed and the batch size: anything else is refused in one line."""
        name = getattr(selector, "name", selector)
        asked = [what for what, given in (("--selector " + str(name), name != "gate"), ("--steps", steps is not None),
                                          ("--stop-threshold", stop_threshold is not None),
                                          ("--prompt", prompt is not None), ("--trajectory", bool(trajectory)),
                                          ("selector options", bool(options))) if given]
        if asked:
            raise ImadaremError(f"{os.path.basename(self.model.path)} is a decode file: its graph runs the gate "
                                f"selector's draft-and-verify loop itself, so it takes no {', '.join(asked)} (use "
                                "the step file it was exported from for those)")

    def _make_selector(self, selector: str | Selector, options: dict[str, Any]) -> Selector:
        sel = create_selector(selector, **options) if isinstance(selector, str) else selector
        if not isinstance(sel, Selector):
            raise SelectorError(f"a selector must be a Selector instance or a plugin name, got {type(sel).__name__}")
        missing = sorted(set(sel.requires) - set(self.model.outputs))
        if missing:
            raise SelectorError(f"selector {sel.name!r} needs the model output {', '.join(missing)}, which "
                                f"{os.path.basename(self.model.path)} does not have")
        return sel

    def _resolve(self, selector, steps, temperature, stop_threshold, prompt, trajectory, options,
                 decode: bool = True) -> _Run:
        cfg = self.model_config  # checked when the file was opened: only the caller's values can be bad here
        num_steps = cfg.max_refinement_steps if steps is None else _positive_int("steps", steps, MAX_STEPS)
        temp = _temperature(temperature, cfg.sampling_temperature)
        stop = cfg.stop_threshold if stop_threshold is None else _number("stop_threshold", stop_threshold)
        if not 0.0 <= stop <= 1.0:
            raise ImadaremError(f"stop_threshold must be in [0, 1], got {stop_threshold!r}")
        max_len = self.model.max_seq_len
        layout = (blank_layout(max_len, self.special) if prompt is None
                  else parse_prompt(prompt, self.tokenizer, self.special, max_len))
        sel = self._make_selector(selector, options)
        return _Run(sel, num_steps, temp, stop, layout, bool(trajectory), dict(self.config), decode)

    # -- the loop ------------------------------------------------------------------------------
    def _state(self, n: int, layout: Layout, streams: SampleStreams):
        if getattr(self.model, "causal", False):
            from imadarem.runtime.causal_step import CausalLoopState

            return CausalLoopState(self.model, n, layout.length, layout.eos_only, streams.keys())
        length = layout.length
        if self.provider == "cuda":
            return _DeviceCond(self.model, n, length)
        return _HostCond(self.model, n, length)

    def _refine(self, n: int, run: _Run, streams: SampleStreams,
                timings: LoopTimings | None = None) -> list[Sample]:
        """The loop of docs/ARCHITECTURE.md: per step run the model, sample, select, apply, freeze EOS,
        stop, compact."""
        K = run.num_steps
        batch = _Batch.start(n, run.layout, K, run.trajectory)
        bias = logit_bias(run.layout, self.model.vocab_size, self._banned, self.special.eos)
        in_graph = self.graph_sampling and self.model.graph_sampling
        # the self-conditioning state (on the host or on the GPU), or a causal file's KV cache
        cond = self._state(n, run.layout, streams)
        sel = run.selector
        selector_call(sel, "begin", batch_size=n, length=run.layout.length, num_steps=K, config=run.config)
        for t in range(K):
            if batch.active.size == 0:
                break
            step_started = time.perf_counter()
            x, fz = batch.current()
            temp = _checked_temperature(sel, selector_call(sel, "step_temperature", t, K, run.temperature))
            if getattr(cond, "causal", False):  # verify the last drafts, commit, present the next window
                x, fz, out, run_seconds = cond.advance(x, fz, run.temperature, temp, bias)
                batch.tokens[batch.active], batch.frozen[batch.active] = x, fz
                proposals, logits, measures = out.pop("proposals"), _ro(out["logits"]), None
            else:
                first = batch.trim(x, self.special.eos, self.trim_padding)
                out, run_seconds = self._run_step(cond, batch, x, t, K, temp, bias, streams, in_graph)
                proposals, logits, measures = self._sample(out, batch, temp, bias, first, streams, in_graph)
            state = StepState(t=t, num_steps=K, tokens=_ro(x), proposals=_ro(proposals), logits=logits,
                              gate=_ro(out.get("gate")), critic=_ro(out.get("critic")), frozen=_ro(fz),
                              rows=_ro(batch.active), rng=streams.for_rows(batch.active), temperature=temp,
                              mask_id=self.special.mask,
                              pad_id=self.special.pad, eos_id=self.special.eos, config=run.config,
                              measures=measures)
            decision = selector_call(sel, "select", state)
            problem = decision_problem(decision, x.shape)
            if problem is not None:
                raise PluginError(f"{selector_label(sel)}: select() {problem}")
            new, update, remask = self._apply(decision, x, fz, proposals, last=t == K - 1)
            new, new_fz = self._freeze_eos(new, fz)
            done, changed, ratio = self._stop(t, new, x, fz, new_fz, decision, run.stop_threshold)
            batch.record(t, x, fz, new, new_fz, changed, remask, ratio, done, self.special)
            rows_run = batch.active.size
            keep = batch.compact(done)
            cond.keep(keep)
            if timings is not None:
                timings.active_rows.append(int(rows_run))
                timings.run_lengths.append(cond.fed if getattr(cond, "causal", False) else batch.cut)
                timings.run_seconds.append(run_seconds)
                timings.step_seconds.append(time.perf_counter() - step_started)
        return [self._finish(batch.tokens[i], int(batch.steps_used[i]), batch.row_edits(i),
                             bool(batch.early[i]), batch.trajectories[i] if batch.trajectories else None, run.decode)
                for i in range(n)]

    # -- the phases of one step ----------------------------------------------------------------------
    def _run_step(self, cond, batch: _Batch, x, t: int, K: int, temp: float, bias, streams: SampleStreams,
                  in_graph: bool):
        """Run the model once on the active rows, up to ``batch.cut``; the outputs widened back to the
        full length for the selector, and the seconds spent inside onnxruntime. (Each row draws its
        uniforms for the full length, so what it samples does not depend on where the others end.)"""
        length = x.shape[1]
        feed_x = x if batch.cut == length else np.ascontiguousarray(x[:, : batch.cut])
        step = np.full(x.shape[0], rules.model_step(t, K, self.model_config.max_refinement_steps), dtype=np.int64)
        sampling = None
        if in_graph:
            uniform = streams.uniforms(batch.active, (length,))
            sampling = (np.ascontiguousarray(uniform[:, : batch.cut]), np.full(x.shape[0], temp, np.float32),
                        bias[: batch.cut])
        started = time.perf_counter()
        out = cond.run(feed_x, step, sampling)
        seconds = time.perf_counter() - started
        return (_widen(out, length) if batch.cut < length else out), seconds

    def _sample(self, out, batch: _Batch, temp: float, bias, first, streams: SampleStreams, in_graph: bool):
        """Proposals, the (banned) logits for the selector and, from the sampling head, the measures."""
        eos, length = self.special.eos, batch.tokens.shape[1]
        if in_graph:
            measures = {"entropy": out["entropy"], "top2": (out["top1"], out["top2"]),
                        "proposal_prob": out["proposal_prob"], "current_prob": out["current_prob"]}
            return out["proposals"], _LazyLogits(out["logits"], length, bias, first, eos), measures
        logits = out["logits"]
        ban_logits(logits, bias, first, eos)
        logits = _ro(logits)
        uniforms = None if temp <= rules.GREEDY_TEMPERATURE else streams.uniforms(batch.active, logits.shape[1:])
        return sample_proposals(logits, temp, uniforms), logits, None

    def _apply(self, decision: Decision, x, fz, proposals, last: bool):
        """Take the selector's updates and re-masks (never on frozen positions; at the last step every
        leftover mask takes its proposal)."""
        mask = self.special.mask
        update = np.asarray(decision.update, dtype=bool) & ~fz
        remask = (np.zeros_like(update) if decision.remask is None
                  else np.asarray(decision.remask, dtype=bool) & ~fz & ~update)
        if last:
            update |= (x == mask) & ~fz
            remask[:] = False
        new = np.where(update, proposals, x)
        new[remask] = mask
        return new, update, remask

    def _freeze_eos(self, new, fz):
        if self.special.eos is None:
            return new, fz
        return rules.freeze_after_eos(new, fz.copy(), self.special.eos, self.special.pad)

    def _stop(self, t: int, new, x, fz, new_fz, decision: Decision, stop_threshold: float):
        """Which rows are done: all frozen, or quiet (change ratio under the threshold, or the selector
        says so) with no mask left; also the changed counts and ratios of the step."""
        _, ratio = rules.change_ratio(new, x, fz)
        changed = rules.edits(new, x, fz, self.special.pad)
        masks_left = ((new == self.special.mask) & ~new_fz).any(-1)
        quiet_ratio = ratio if decision.stop is None else np.where(np.asarray(decision.stop, dtype=bool), -1.0, ratio)
        done = rules.finished(t, quiet_ratio, stop_threshold, masks_left, new_fz.all(-1))
        return done, changed, ratio

    def _finish(self, row: np.ndarray, steps: int, edits: list[int], early: bool,
                trajectory: list[TrajectoryStep] | None, decode: bool = True) -> Sample:
        ids = row.tolist()
        sp = self.special
        if sp.eos is not None and sp.eos in ids:
            ids = ids[: ids.index(sp.eos) + 1]
        else:
            while ids and ids[-1] == sp.pad:
                ids.pop()
        return Sample(self.tokenizer.decode(ids) if decode else None, ids, steps, edits, early, trajectory)


class _HostCond:
    """``cond`` as a numpy array: run the step with ``session.run`` and keep ``cond_next``."""

    def __init__(self, model: ModelFile, n: int, length: int):
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
    """``cond`` kept on the GPU with IO binding: only tokens, step (and row indices) go up and only
    the per-position outputs the selectors read (logits, gate, critic) come down.

    With a ``cond_rows`` graph (``imadarem export --device-state``, the default for ``--fp16``) the
    state never leaves the GPU: the graph picks the active rows and positions. Without it, the state
    stays there while the active batch and length are unchanged, and makes one round trip when they
    change.
    """

    def __init__(self, model: ModelFile, n: int, length: int):
        import onnxruntime as ort

        self.ort, self.model = ort, model
        self.value = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((n, length, model.hidden_size), dtype=np.float32), "cuda", 0)
        self.rows = np.arange(n, dtype=np.int64)
        self.in_graph = model.device_state

    def run(self, tokens: np.ndarray, step: np.ndarray, sampling: tuple | None = None) -> dict[str, Any]:
        """Outputs as host arrays, except ``logits`` of a sampling-head step: an OrtValue on the GPU
        (read only if a selector asks for the full distribution)."""
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


def _open_any(model_path, provider: str, threads: int | None):
    """The checked model file at ``model_path`` (default: the bundled one), whatever its format."""
    from imadarem.runtime.causal import is_causal, load_causal_file
    from imadarem.runtime.decode import is_decode, load_decode_file
    from imadarem.runtime.modelfile import open_session

    if model_path is None:
        model_path = default_model_path()
        if model_path is None:
            raise ModelFileError("no MODEL given and this installation has no bundled default model")
    opened = open_session(model_path, provider, threads)
    if is_decode(opened[1]):
        return load_decode_file(str(model_path), provider, threads, opened=opened)
    if is_causal(opened[1]):
        return load_causal_file(str(model_path), provider, threads, opened=opened)
    return load_model_file(model_path, provider, threads, opened=opened)


def open_generator(model_path: str | os.PathLike | None = None, provider: str = "cpu", threads: int | None = None):
    """A ``Generator`` for any model file (kept for the callers of 0.x; ``Generator(path)`` does the same)."""
    return Generator(model_path, provider, threads)


def banned_ids(special, unk: int | None = None) -> np.ndarray:
    """Ids never proposed: MASK, PAD (padding only ever follows a committed EOS) and UNK if any."""
    ids = {special.mask, special.pad} | ({unk} if unk is not None and unk not in (special.eos,) else set())
    return np.array(sorted(ids), dtype=np.int64)


def logit_bias(layout: Layout, vocab_size: int, banned: np.ndarray, eos: int | None) -> np.ndarray:
    """[length, vocab] additive bias holding every ban that depends only on the run: the banned ids
    everywhere and, for a template, no EOS where it may not go and only EOS in its closing slot."""
    bias = np.zeros((layout.length, vocab_size), dtype=np.float32)
    bias[:, banned] = -np.inf
    if eos is not None:
        bias[~layout.eos_allowed, eos] = -np.inf
        bias[layout.eos_only, :] = -np.inf
        bias[layout.eos_only, eos] = 0.0
    return bias


def ban_logits(logits: np.ndarray, bias: np.ndarray, first: np.ndarray | None, eos: int | None) -> None:
    """Apply ``logit_bias`` and the per-row ban in place: no EOS before a row's first committed EOS
    (``first``; = length when there is none), so the length and its padding are final once chosen.
    The sampling head does the same inside the graph."""
    logits += bias
    if eos is not None:
        logits[..., eos][rules.eos_banned(first, logits.shape[1])] = -np.inf


class _LazyLogits:
    """The banned logits of a step whose sampling ran in the graph, fetched (from the GPU, if that is
    where they are) and widened only when a selector reads ``state.logits``."""

    def __init__(self, value, length: int, bias: np.ndarray, first: np.ndarray | None, eos: int | None):
        self.value, self.length, self.bias, self.first, self.eos = value, length, bias, first, eos

    def __call__(self) -> np.ndarray:
        host = self.value if isinstance(self.value, np.ndarray) else self.value.numpy()
        logits = _widen({"logits": host}, self.length)["logits"].copy()
        ban_logits(logits, self.bias, self.first, self.eos)
        return _ro(logits)


def sample_proposals(logits: np.ndarray, temperature: float, uniforms: np.ndarray | None) -> np.ndarray:
    """Gumbel-max sampling from softmax(logits / temperature); argmax when temperature is 0.

    ``uniforms``: one draw per logit, of shape logits.shape (ignored, and may be None, at temperature 0);
    the PyTorch reference loop draws the same numbers and so samples the same tokens for the same seed.
    """
    if temperature <= rules.GREEDY_TEMPERATURE:
        return logits.argmax(-1)
    return rules.gumbel_max(logits, np.float32(temperature), uniforms)


def _checked_temperature(selector: Selector, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value < 0:
        raise SelectorError(f"{selector_label(selector)}: step_temperature() must return a number >= 0, got {value!r}")
    return float(value)


def _ro(array: np.ndarray | None) -> np.ndarray | None:
    if array is None:
        return None
    view = array.view()
    view.flags.writeable = False
    return view


def _widen(out: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Per-position outputs of a trimmed run, zero-filled back to ``length`` for the selector
    (the filled positions are frozen padding: nothing there is ever updated). ``cond_next`` stays
    trimmed: it is only fed back."""
    wide = dict(out)
    for name, value in out.items():
        if name != "cond_next" and isinstance(value, np.ndarray) and value.ndim >= 2 and value.shape[1] < length:
            full = np.zeros((value.shape[0], length, *value.shape[2:]), dtype=value.dtype)
            full[:, : value.shape[1]] = value
            wide[name] = full
    return wide


