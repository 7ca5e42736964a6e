"""The selector contract: what a selector sees at each step and what it answers.

A selector is a plugin class. The loop builds one instance per ``generate`` call (so selectors may keep
per-run state), calls ``begin`` once, then ``select`` at every step with a read-only :class:`StepState`.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.errors import SelectorError
from imadarem.runtime.rules import check_schedule, mask_schedule

__all__ = ["Decision", "Selector", "StepState", "check_bool", "check_fraction", "check_int", "check_noise", "check_number",
           "check_schedule", "decision_problem", "gumbel",
           "keep_top", "mask_schedule", "masks_after_step", "softmax", "with_annealed_noise"]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


class StepState:
    """One refinement step of the active sequences, as the selector sees it (arrays are read-only).

    ``tokens``: [B, L] current sequence; ``proposals``: [B, L] sampled candidates; ``logits``: [B, L, V]
    with PAD and MASK already excluded (-inf); ``gate``/``critic``: [B, L] model outputs or None;
    ``frozen``: [B, L] positions that never change; ``rows``: index of each active sequence in the
    whole request (for selectors that keep per-sequence memory); ``t`` 0-based, ``num_steps`` = K.
    ``rng``: a :class:`~imadarem.runtime.randomness.RowRandom`; draw with a size that starts with B
    (e.g. ``state.rng.random(state.tokens.shape)``) and each row's numbers come from its own sample's
    stream, so the result does not depend on the batch size.

    When the model file samples in the graph (its sampling head), the loop hands over ``logits`` as a
    zero-argument function and the uncertainty measures (``entropy``, ``top2``, ``proposal_prob``,
    ``current_prob``) as ``measures``: reading ``logits`` (or ``probs``) then costs one copy from the
    GPU, so selectors should prefer the measures, which are free.
    """

    def __init__(self, *, t: int, num_steps: int, tokens: np.ndarray, proposals: np.ndarray,
                 logits: np.ndarray | Callable[[], np.ndarray], gate: np.ndarray | None,
                 critic: np.ndarray | None, frozen: np.ndarray, rows: np.ndarray, rng: Any,
                 temperature: float, mask_id: int, pad_id: int, eos_id: int | None,
                 config: dict[str, Any] | None = None, measures: dict[str, Any] | None = None):
        self.t, self.num_steps = t, num_steps
        self.tokens, self.proposals, self.gate, self.critic = tokens, proposals, gate, critic
        self.frozen, self.rows, self.rng, self.temperature = frozen, rows, rng, temperature
        self.mask_id, self.pad_id, self.eos_id = mask_id, pad_id, eos_id
        self.config = {} if config is None else config
        self._logits = logits
        for name, value in (measures or {}).items():  # pre-computed cached properties
            if name not in _MEASURES:
                raise ValueError(f"unknown step measure {name!r}")
            self.__dict__[name] = value

    @property
    def logits(self) -> np.ndarray:
        if callable(self._logits):
            self._logits = self._logits()
        return self._logits

    @cached_property
    def is_mask(self) -> np.ndarray:
        return self.tokens == self.mask_id

    @cached_property
    def editable(self) -> np.ndarray:
        """Positions a selector may change: everything not frozen."""
        return ~self.frozen

    @cached_property
    def probs(self) -> np.ndarray:
        """softmax(logits) at temperature 1: the model's own belief, used for uncertainty measures."""
        return softmax(self.logits.astype(np.float32, copy=True))

    @cached_property
    def entropy(self) -> np.ndarray:
        """Per-position entropy in nats, [B, L]."""
        return rules.entropy(self.logits)

    @cached_property
    def top2(self) -> tuple[np.ndarray, np.ndarray]:
        """The two largest probabilities per position, [B, L] each."""
        part = np.partition(self.probs, -2, axis=-1)[..., -2:]
        return part[..., 1], part[..., 0]

    @cached_property
    def confidence(self) -> np.ndarray:
        """Probability of the most likely token, [B, L]."""
        return self.top2[0]

    @cached_property
    def margin(self) -> np.ndarray:
        """top-1 minus top-2 probability, [B, L]."""
        first, second = self.top2
        return first - second

    @cached_property
    def proposal_prob(self) -> np.ndarray:
        """Probability of each sampled proposal, [B, L]."""
        return np.take_along_axis(self.probs, self.proposals[..., None], axis=-1)[..., 0]

    @cached_property
    def current_prob(self) -> np.ndarray:
        """Probability the model gives the token currently in place (0 for masks), [B, L]."""
        cur = np.where(self.is_mask, 0, self.tokens)
        p = np.take_along_axis(self.probs, cur[..., None], axis=-1)[..., 0]
        return np.where(self.is_mask, 0.0, p).astype(np.float32)


_MEASURES = ("entropy", "top2", "proposal_prob", "current_prob")


@dataclass
class Decision:
    """A selector's answer for one step.

    ``update``: [B, L] bool, positions that take their proposal. ``remask``: optional [B, L] bool,
    positions that go back to ``[MASK]``. ``stop``: optional [B] bool, sequences the selector considers
    finished. The loop ignores both on frozen positions and resolves leftover masks at the last step.
    """

    update: np.ndarray
    remask: np.ndarray | None = None
    stop: np.ndarray | None = None


def decision_problem(decision: Any, shape: tuple[int, int]) -> str | None:
    """What is wrong with a selector's answer for a [B, L] step, or None: ``update`` (and ``remask``, if
    given) must be bool arrays of shape [B, L], ``stop`` a bool array of shape [B]. Checked at every step,
    so a selector's bug is reported as its own instead of surfacing as a broken loop."""
    if not isinstance(decision, Decision):
        return f"must return a Decision, got {type(decision).__name__}"
    for name, want in (("update", shape), ("remask", shape), ("stop", shape[:1])):
        value = getattr(decision, name)
        if value is None and name != "update":
            continue
        if not isinstance(value, np.ndarray):
            return f"returned Decision.{name} of type {type(value).__name__}; expected a bool array of shape {list(want)}"
        if value.dtype != np.bool_:
            return f"returned Decision.{name} of dtype {value.dtype}; expected bool"
        if value.shape != tuple(want):
            return f"returned Decision.{name} of shape {list(value.shape)}; expected {list(want)}"
    return None


class Selector(abc.ABC):
    """Base class of selector plugins. Subclasses take their options as keyword arguments."""

    name: ClassVar[str]
    #: model outputs beyond ``logits`` that this selector needs, e.g. ``frozenset({"critic"})``.
    requires: ClassVar[frozenset[str]] = frozenset()
    #: one line for ``imadarem plugins``.
    summary: ClassVar[str] = ""

    def begin(self, *, batch_size: int, length: int, num_steps: int, config: dict[str, Any]) -> None:
        """Called once per generate call, before the first step (optional hook)."""
        return None

    def step_temperature(self, t: int, num_steps: int, base: float) -> float:
        """Sampling temperature for step ``t``; selectors that anneal override this."""
        return base

    @abc.abstractmethod
    def select(self, state: StepState) -> Decision:
        """Decide which positions take their proposal (and which go back to mask) at this step."""

    @classmethod
    def option_names(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters
        return [p for p in params if p != "self" and params[p].kind == inspect.Parameter.KEYWORD_ONLY]

    @classmethod
    def create(cls, **options: Any) -> Selector:
        """Build with ``options``, turning unknown or bad options into one-line SelectorErrors."""
        known = cls.option_names()
        unknown = sorted(set(options) - set(known))
        if unknown:
            listing = ", ".join(known) if known else "none"
            raise SelectorError(f"selector {cls.name!r} has no option {', '.join(unknown)} (options: {listing})")
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            raise SelectorError(f"selector {cls.name!r}: {exc}") from None


def check_bool(name: str, value: Any) -> bool:
    """An on/off option: a bool (``-o name=true`` / ``false`` on the command line), nothing else, so that
    ``False`` or ``no`` typed as a string is never read as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def check_number(name: str, value: Any, low: float | None = None) -> float:
    """A finite number option (at least ``low`` when given)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or (low is not None and value < low):
        bound = f" >= {low:g}" if low is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, low: int = 1) -> int:
    """An integer option of at least ``low`` (``1.5`` is refused, never truncated)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_fraction(name: str, value: float, *, open_low: bool = False) -> float:
    """Validate an option that must lie in [0, 1] (or (0, 1])."""
    value = check_number(name, value)
    if not (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in {'(0, 1]' if open_low else '[0, 1]'}, got {value}")
    return value


def keep_top(scores: np.ndarray, candidates: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row, the ``counts[row]`` candidates with the highest scores (ties broken by position)."""
    masked_scores = np.where(candidates, scores, -np.inf)
    order = np.argsort(-masked_scores, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[-1])[None, :].repeat(order.shape[0], 0), axis=-1)
    return candidates & (ranks < np.asarray(counts)[:, None])


def check_noise(noise: float) -> float:
    return check_number("noise", noise, 0.0)


def masks_after_step(state: StepState, schedule: str) -> np.ndarray:
    """[B] how many editable positions the schedule leaves masked after this step (MaskGIT's count)."""
    ratio = (state.t + 1) / state.num_steps
    return np.floor(state.editable.sum(-1) * mask_schedule(schedule, ratio)).astype(np.int64)


def with_annealed_noise(score: np.ndarray, noise: float, state: StepState) -> np.ndarray:
    """``score`` plus Gumbel noise scaled by noise * (1 - (t + 1) / K): random early, greedy at the end
    (MaskGIT's choice temperature, the token critic's annealed noise)."""
    scale = noise * (1.0 - (state.t + 1) / state.num_steps)
    return score + scale * gumbel(state.rng, score.shape) if scale > 0 else score


def gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gumbel noise of ``shape`` from the step's generator (the rule itself is :func:`rules.gumbel`)."""
    return rules.gumbel(rng.random(shape, dtype=np.float32))
