"""The refinement loop over one exported step, in numpy + onnxruntime (DESIGN.md, "The loop").

x starts as all masks (or a prompt layout) and cond as zeros. Each step runs the model once on the
active sequences, samples proposals, lets the selector choose what to update or re-mask, freezes EOS,
and drops sequences whose change ratio fell under ``stop_threshold``. Leftover masks are resolved at
the last step. A Generator holds no per-call state, so one instance serves many threads at once.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from imadarem.runtime.errors import ImadaremError, ModelFileError, SelectorError
from imadarem.runtime.modelfile import SAMPLING_INPUTS, ModelFile, default_model_path, load_model_file
from imadarem.runtime.prompt import Layout, blank_layout, parse_prompt
from imadarem.runtime.registry import create_selector
from imadarem.runtime.selector import Selector, StepState


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
    edits: list[int]  # positions changed at each step
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


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ImadaremError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


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


class Generator:
    """Generate sequences from an Imadarem model file with numpy + onnxruntime."""

    def __init__(self, model_path: str | os.PathLike | None = None, provider: str = "cpu",
                 threads: int | None = None):
        if model_path is None:
            model_path = default_model_path()
            if model_path is None:
                raise ModelFileError("no MODEL given and this installation has no bundled default model")
        self._attach(load_model_file(model_path, provider=provider, threads=threads), provider)

    @classmethod
    def from_model_file(cls, model: ModelFile, provider: str = "cpu") -> Generator:
        """A Generator over an already opened and checked model file."""
        gen = cls.__new__(cls)
        gen._attach(model, provider)
        return gen

    def _attach(self, model: ModelFile, provider: str) -> None:
        self.model = model
        self.provider = provider
        self.config = self.model.config
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
        """Generate ``n`` sequences; every knob left None defaults from the model's config.

        ``timings``, when given, is filled with per-step wall and ``session.run`` times. ``decode=False``
        leaves ``Sample.text`` None (ids only; decoding SELFIES to SMILES costs more than a GPU step).
        """
        started = time.perf_counter()
        n = _positive_int("n", n)
        run = self._resolve(selector, steps, temperature, stop_threshold, prompt, trajectory, selector_options,
                            decode)
        batch = n if batch_size is None else _positive_int("batch_size", batch_size)
        seq = np.random.SeedSequence(seed)
        samples: list[Sample] = []
        for chunk, child in zip(range(0, n, batch), seq.spawn(math.ceil(n / batch))):
            size = min(batch, n - chunk)
            if chunk > 0:  # a fresh selector per chunk: selectors may keep per-run state
                run.selector = self._make_selector(selector, selector_options)
            samples += self._refine(size, run, np.random.default_rng(child), timings)
        if timings is not None:
            timings.total_seconds += time.perf_counter() - started
        return samples

    # -- setup ---------------------------------------------------------------------------------
    def _make_selector(self, selector: str | Selector, options: dict[str, Any]) -> Selector:
        sel = create_selector(selector, **options) if isinstance(selector, str) else selector
        missing = sorted(set(sel.requires) - set(self.model.outputs))
        if missing:
            raise SelectorError(f"selector {sel.name!r} needs the model output {', '.join(missing)}, which "
                                f"{os.path.basename(self.model.path)} does not have")
        return sel

    def _resolve(self, selector, steps, temperature, stop_threshold, prompt, trajectory, options,
                 decode: bool = True) -> _Run:
        cfg = self.config
        num_steps = _positive_int("steps", cfg["max_refinement_steps"] if steps is None else steps)
        temp = float(cfg["sampling_temperature"] if temperature is None else temperature)
        if not math.isfinite(temp) or temp < 0:
            raise ImadaremError(f"temperature must be >= 0, got {temperature!r}")
        stop = float(cfg["stop_threshold"] if stop_threshold is None else stop_threshold)
        if not 0.0 <= stop <= 1.0:
            raise ImadaremError(f"stop_threshold must be in [0, 1], got {stop_threshold!r}")
        max_len = self.model.max_seq_len
        layout = (blank_layout(max_len, self.special) if prompt is None
                  else parse_prompt(prompt, self.tokenizer, self.special, max_len))
        sel = self._make_selector(selector, options)
        return _Run(sel, num_steps, temp, stop, layout, bool(trajectory), dict(cfg), decode)

    # -- the loop ------------------------------------------------------------------------------
    def _state(self, n: int, length: int) -> _HostCond | _DeviceCond:
        if self.provider == "cuda":
            return _DeviceCond(self.model, n, length)
        return _HostCond(self.model, n, length)

    def _refine(self, n: int, run: _Run, rng: np.random.Generator,
                timings: LoopTimings | None = None) -> list[Sample]:
        sp = self.special
        layout = run.layout
        length, K = layout.length, run.num_steps
        tokens = np.broadcast_to(layout.ids, (n, length)).copy()
        frozen = np.broadcast_to(layout.fixed, (n, length)).copy()
        bias = logit_bias(layout, self.model.vocab_size, self._banned, sp.eos)
        in_graph = self.graph_sampling and self.model.graph_sampling
        model_steps = int(self.config["max_refinement_steps"])
        run.selector.begin(batch_size=n, length=length, num_steps=K, config=run.config)

        steps_used = np.zeros(n, dtype=np.int64)
        early = np.zeros(n, dtype=bool)
        edits = np.full((n, K), -1, dtype=np.int64)  # changed tokens per step; -1 once a row has left
        traj: list[list[TrajectoryStep]] | None = [[] for _ in range(n)] if run.trajectory else None
        active = np.arange(n)
        cond = self._state(n, length)  # the self-conditioning state, on the host or on the GPU
        cut = length  # positions the model runs on

        for t in range(K):
            if active.size == 0:
                break
            step_started = time.perf_counter()
            x, fz = tokens[active], frozen[active]
            first = None if sp.eos is None else _first_eos(x, sp.eos)  # = length when a row has none
            if self.trim_padding and first is not None:  # non-increasing: committed EOS never move
                cut = min(cut, int(first.max()) + 1)
            feed_x = x if cut == length else np.ascontiguousarray(x[:, :cut])
            temp = run.selector.step_temperature(t, K, run.temperature)
            step = np.full(x.shape[0], model_step(t, K, model_steps), dtype=np.int64)
            sampling = None
            if in_graph:
                sampling = (rng.random(feed_x.shape, dtype=np.float32), np.full(x.shape[0], temp, np.float32),
                            bias[:cut])
            run_started = time.perf_counter()
            out = cond.run(feed_x, step, sampling)
            run_seconds = time.perf_counter() - run_started
            if cut < length:
                out = _widen(out, length)
            measures = None
            if in_graph:
                proposals = out["proposals"]
                measures = {"entropy": out["entropy"], "top2": (out["top1"], out["top2"]),
                            "proposal_prob": out["proposal_prob"], "current_prob": out["current_prob"]}
                logits = _LazyLogits(out["logits"], length, bias, first, sp.eos)
            else:
                logits = out["logits"]
                ban_logits(logits, bias, first, sp.eos)
                logits = _ro(logits)
                proposals = sample_proposals(logits, temp, rng)
            state = StepState(t=t, num_steps=K, tokens=_ro(x), proposals=_ro(proposals), logits=logits,
                              gate=_ro(out.get("gate")), critic=_ro(out.get("critic")), frozen=_ro(fz),
                              rows=_ro(active), rng=rng, temperature=temp, mask_id=sp.mask, pad_id=sp.pad,
                              eos_id=sp.eos, config=run.config, measures=measures)
            decision = run.selector.select(state)
            update = np.asarray(decision.update, dtype=bool) & ~fz
            remask = (np.zeros_like(update) if decision.remask is None
                      else np.asarray(decision.remask, dtype=bool) & ~fz & ~update)
            if t == K - 1:  # nothing may stay masked after the last step
                update |= (x == sp.mask) & ~fz
                remask[:] = False
            new = np.where(update, proposals, x)
            new[remask] = sp.mask
            new_frozen = fz
            if sp.eos is not None:
                new, new_frozen = _freeze_after_eos(new, fz.copy(), sp.eos, sp.pad)
            changed = (new != x) & ~fz
            n_changed = changed.sum(-1)
            ratio = n_changed / np.maximum((~fz).sum(-1), 1)
            tokens[active], frozen[active] = new, new_frozen
            steps_used[active] = t + 1
            masks_left = ((new == sp.mask) & ~new_frozen).any(-1)
            nothing_left = new_frozen.all(-1)
            quiet = ratio < run.stop_threshold
            if decision.stop is not None:
                quiet |= np.asarray(decision.stop, dtype=bool)
            done = nothing_left | ((t > 0) & quiet & ~masks_left)
            if t < K - 1:
                early[active[done]] = True
            edits[active, t] = n_changed
            if traj is not None:
                for j, row in enumerate(active):
                    refined = changed[j] & (new[j] != sp.mask) & (new[j] != sp.pad)
                    traj[row].append(TrajectoryStep(t, new[j].tolist(), np.flatnonzero(refined).tolist(),
                                                    np.flatnonzero(remask[j] & (x[j] != sp.mask)).tolist(),
                                                    float(ratio[j]), bool(done[j]) and t < K - 1))
            keep = ~done
            rows_run = active.size
            active = active[keep]
            cond.keep(keep)
            if timings is not None:
                timings.active_rows.append(int(rows_run))
                timings.run_lengths.append(cut)
                timings.run_seconds.append(run_seconds)
                timings.step_seconds.append(time.perf_counter() - step_started)

        return [self._finish(tokens[i], int(steps_used[i]), edits[i, : steps_used[i]].tolist(), bool(early[i]),
                             traj[i] if traj is not None else None, run.decode) for i in range(n)]

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
        length = logits.shape[1]
        logits[..., eos][np.arange(length)[None, :] < np.where(first < length, first, 0)[:, None]] = -np.inf


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


def model_step(t: int, num_steps: int, model_steps: int) -> int:
    """The model's step index for run step t of num_steps: the run's schedule stretched onto the K the
    model was trained with, so a run with more (or fewer) steps than K still sees familiar step indices."""
    if num_steps == model_steps:
        return t
    return min(model_steps - 1, t * model_steps // num_steps)


def sample_proposals(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Gumbel-max sampling from softmax(logits / temperature); argmax when temperature is 0.

    One uniform draw per logit, of shape logits.shape, whatever the temperature > 0: the PyTorch
    reference loop draws the same numbers and so samples the same tokens for the same seed.
    """
    if temperature <= 1e-6:
        return logits.argmax(-1)
    noise = rng.random(logits.shape, dtype=np.float32)
    np.clip(noise, 1e-20, 1.0 - 1e-7, out=noise)
    np.log(noise, out=noise)
    np.negative(noise, out=noise)
    np.log(noise, out=noise)  # log(-log u) = -Gumbel
    return (logits / np.float32(temperature) - noise).argmax(-1)


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


def _first_eos(tokens: np.ndarray, eos: int) -> np.ndarray:
    """Position of the first EOS of each row (the row length when there is none)."""
    is_eos = tokens == eos
    return np.where(is_eos.any(-1), is_eos.argmax(-1), tokens.shape[1])


def _freeze_after_eos(tokens: np.ndarray, frozen: np.ndarray, eos: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Freeze the first EOS of each row and turn everything after it into frozen padding."""
    first = _first_eos(tokens, eos)
    if (first == tokens.shape[1]).all():
        return tokens, frozen
    pos = np.arange(tokens.shape[1])[None, :]
    after = pos > first[:, None]
    tokens = np.where(after, pad, tokens)
    frozen = frozen | after | (pos == first[:, None])
    return tokens, frozen
