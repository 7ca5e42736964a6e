"""The refinement loop: one selector-driven step per model call (docs/ARCHITECTURE.md, "The loop").

Each step runs the model on the active rows (the format's :class:`ModelStep`), shows the selector a
read-only :class:`StepState`, applies its decision (frozen positions never change; at the last step every
leftover mask takes its proposal), freezes EOS, and lets rows whose change ratio fell under
``stop_threshold`` (or that are all frozen) leave the batch. Formats differ only in what a model call
does and shows: a refinement step (``formats/refine.py``) or draft-and-verify over a causal step
(``formats/causal.py``).
"""

from __future__ import annotations

import abc
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.errors import PluginError, SelectorError
from imadarem.runtime.prompt import Layout
from imadarem.runtime.randomness import SampleStreams
from imadarem.runtime.registry import create_selector, selector_call, selector_label
from imadarem.runtime.results import BatchResult, CallReport, TrajectoryStep
from imadarem.runtime.selector import Decision, Selector, StepState, decision_problem
from imadarem.runtime.strategy import Decoding, Plan

#: what a draft-and-verify call presents to selectors (StepState.logits, .gate, .critic), computed from its
#: verification (causal files, block refine files with drafts)
PRESENTED_OUTPUTS = ("logits", "gate", "critic")


@dataclass
class Shown:
    """What one model call gives the selector: the rows' tokens and frozen mask (a causal call commits
    tokens itself), proposals, logits (an array, or a function that fetches them), gate, critic, the
    sampling head's measures, and the call's seconds and fed length."""

    x: np.ndarray
    frozen: np.ndarray
    proposals: np.ndarray
    logits: Any
    gate: np.ndarray | None
    critic: np.ndarray | None
    measures: dict[str, Any] | None
    run_seconds: float
    run_length: int
    committed: bool = False  # the call changed x / frozen itself (written back to the batch)


class ModelStep(abc.ABC):
    """A format's model call inside the loop, for one batch (its state: self-conditioning, a KV cache)."""

    @abc.abstractmethod
    def run(self, x: np.ndarray, frozen: np.ndarray, t: int, num_steps: int, step_temperature: float,
            rows: np.ndarray) -> Shown:
        """Run the model on the active rows ``x`` (their request indices ``rows``)."""

    @abc.abstractmethod
    def keep(self, rows: np.ndarray) -> None:
        """Drop the rows that finished (``rows``: the kept-row mask)."""


@dataclass
class LoopSettings:
    """A refinement request resolved against its model."""

    num_steps: int
    temperature: float
    stop_threshold: float
    layout: Layout
    trajectory: bool
    config: dict[str, Any]
    #: decode blocks of this many positions left to right (a ``block`` refine model); 0: all positions at once
    block: int = 0


def make_selector(selector: str | Selector, options: dict[str, Any], outputs, model_name: str) -> Selector:
    """The selector instance, checked: a Selector, whose required model outputs the model has."""
    sel = create_selector(selector, **options) if isinstance(selector, str) else selector
    if not isinstance(sel, Selector):
        raise SelectorError(f"a selector must be a Selector instance or a plugin name, got {type(sel).__name__}")
    missing = sorted(set(sel.requires) - set(outputs))
    if missing:
        raise SelectorError(f"selector {sel.name!r} needs the model output {', '.join(missing)}, which "
                            f"{os.path.basename(model_name)} does not have")
    return sel


class RefinementPlan(Plan):
    """A selector-driven request: settings, a fresh selector per batch, and the format's model step."""

    def __init__(self, settings: LoopSettings, selector: str | Selector, options: dict[str, Any], outputs,
                 model_name: str, special, new_step):
        self.settings, self.special, self.new_step = settings, special, new_step
        self._selector_args = (selector, options, outputs, model_name)
        self._first = make_selector(*self._selector_args)  # checked now, before the first batch

    def start(self, size: int, streams: SampleStreams) -> Decoding:
        sel, self._first = (self._first or make_selector(*self._selector_args)), None
        return RefinementLoop(size, self.settings, sel, self.special, self.new_step(size, streams), streams)


class _Rows:
    """The loop's bookkeeping for one batch: every row's tokens and frozen mask, which rows are still
    active, and what the result reports (steps used, edits per step, early stop, trajectories)."""

    def __init__(self, n: int, layout: Layout, num_steps: int, trajectory: bool):
        self.tokens = np.broadcast_to(layout.ids, (n, layout.length)).copy()
        self.frozen = np.broadcast_to(layout.fixed, (n, layout.length)).copy()
        self.num_steps = num_steps
        self.active = np.arange(n)
        self.steps_used = np.zeros(n, dtype=np.int64)
        self.early = np.zeros(n, dtype=bool)
        self.edits: list[np.ndarray] = []  # per step run: [n] tokens edited, -1 for rows that had left
        self.trajectories: list[list[TrajectoryStep]] | None = [[] for _ in range(n)] if trajectory else None

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


class RefinementLoop(Decoding):
    """One batch of the loop: per :meth:`step`, run the model, select, apply, freeze EOS, stop, compact."""

    def __init__(self, n: int, settings: LoopSettings, selector: Selector, special, model_step: ModelStep,
                 streams: SampleStreams):
        self.s, self.sel, self.special, self.model_step, self.streams = settings, selector, special, model_step, streams
        self.rows = _Rows(n, settings.layout, settings.num_steps, settings.trajectory)
        self.t = 0
        selector_call(selector, "begin", batch_size=n, length=settings.layout.length, num_steps=settings.num_steps,
                      config=settings.config)

    @property
    def active(self) -> int:
        return int(self.rows.active.size) if self.t < self.s.num_steps else 0

    def step(self) -> CallReport:
        t, K, rows, sp = self.t, self.s.num_steps, self.rows, self.special
        x, fz = rows.tokens[rows.active], rows.frozen[rows.active]
        temp = _checked_temperature(self.sel, selector_call(self.sel, "step_temperature", t, K, self.s.temperature))
        shown = self.model_step.run(x, fz, t, K, temp, rows.active)
        if shown.committed:  # a causal call verified drafts and committed tokens itself
            x, fz = shown.x, shown.frozen
            rows.tokens[rows.active], rows.frozen[rows.active] = x, fz
        # what the selector may change: for a block model, the row's current block only
        fz_step = fz if not self.s.block else fz | rules.outside_current_block(x, fz, sp.mask, self.s.block)
        state = StepState(t=t, num_steps=K, tokens=_ro(x), proposals=_ro(shown.proposals), logits=shown.logits,
                          gate=_ro(shown.gate), critic=_ro(shown.critic), frozen=_ro(fz_step), rows=_ro(rows.active),
                          rng=self.streams.for_rows(rows.active), temperature=temp, mask_id=sp.mask, pad_id=sp.pad,
                          eos_id=sp.eos, config=self.s.config, measures=shown.measures)
        decision = selector_call(self.sel, "select", state)
        problem = decision_problem(decision, x.shape)
        if problem is not None:
            raise PluginError(f"{selector_label(self.sel)}: select() {problem}")
        new, remask = self._apply(decision, x, fz_step, fz, shown.proposals, last=t == K - 1)
        new, new_fz = self._freeze_eos(new, fz)
        done, changed, ratio = self._stop(t, new, x, fz, new_fz, decision)
        rows.record(t, x, fz, new, new_fz, changed, remask, ratio, done, sp)
        ran = int(rows.active.size)
        keep = ~done
        rows.active = rows.active[keep]
        self.model_step.keep(keep)
        self.t += 1
        return CallReport(ran, shown.run_seconds, shown.run_length)

    def result(self) -> BatchResult:
        rows = self.rows
        return BatchResult(rows.tokens, rows.steps_used, [rows.row_edits(i) for i in range(rows.tokens.shape[0])],
                           rows.early, rows.trajectories)

    # -- the phases after the model call ----------------------------------------------------------
    def _apply(self, decision: Decision, x, fz_step, fz, proposals, last: bool):
        """Take the selector's updates and re-masks (never on positions frozen for this step; at the last
        step every leftover mask takes its proposal)."""
        mask = self.special.mask
        update = np.asarray(decision.update, dtype=bool) & ~fz_step
        remask = (np.zeros_like(update) if decision.remask is None
                  else np.asarray(decision.remask, dtype=bool) & ~fz_step & ~update)
        if last:
            update |= (x == mask) & ~fz
            remask[:] = False
        new = np.where(update, proposals, x)
        new[remask] = mask
        return new, remask

    def _freeze_eos(self, new, fz):
        if self.special.eos is None:
            return new, fz
        return rules.freeze_after_eos(new, fz.copy(), self.special.eos, self.special.pad)

    def _stop(self, t: int, new, x, fz, new_fz, decision: Decision):
        """Which rows are done: all frozen, or quiet (change ratio under the threshold, or the selector
        says so) with no mask left; also the changed counts and ratios of the step."""
        _, ratio = rules.change_ratio(new, x, fz)
        changed = rules.edits(new, x, fz, self.special.pad)
        masks_left = ((new == self.special.mask) & ~new_fz).any(-1)
        quiet = ratio if decision.stop is None else np.where(np.asarray(decision.stop, dtype=bool), -1.0, ratio)
        settled = new_fz.all(-1)
        if self.s.block:  # a block model changes only its current block: with no open mask, nothing can change
            settled |= ~masks_left
        done = rules.finished(t, quiet, self.s.stop_threshold, masks_left, settled)
        return done, changed, ratio


def _checked_temperature(selector: Selector, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value < 0:
        raise SelectorError(f"{selector_label(selector)}: step_temperature() must return a number >= 0, got {value!r}")
    return float(value)


def _ro(array: np.ndarray | None) -> np.ndarray | None:
    if array is None or not isinstance(array, np.ndarray):
        return array
    view = array.view()
    view.flags.writeable = False
    return view
