"""A generate request: the caller's knobs, checked once before any batch runs.

The Generator checks what every format shares (counts, numbers, the seed); the format's strategy then
checks the rest against its model (step caps, prompts, selectors, draft windows) and refuses what it
cannot do, in one line each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.limits import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_RETRIES,
    MAX_RETRIES,
    MAX_STEPS,
    MAX_TEMPERATURE,
)


def positive_int(name: str, value: Any, most: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
    if not ok or (most is not None and value > most):
        bound = f" (at most {most:,})" if most is not None else ""
        raise ImadaremError(f"{name} must be a positive integer{bound}, got {value!r}")
    return int(value)


def finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise ImadaremError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def temperature_or(value: Any, default: float) -> float:
    """A request's sampling temperature: the model's default, or a finite number >= 0."""
    temp = default if value is None else finite_number("temperature", value)
    if not 0 <= temp <= MAX_TEMPERATURE:
        raise ImadaremError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {value!r}")
    return temp


def checked_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ImadaremError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


@dataclass
class Request:
    """What the caller asked for. ``None`` means "the model's default" for every knob that has one."""

    n: int
    selector: Any = None  # a plugin name or a Selector instance; None: the format's default
    steps: int | None = None
    temperature: float | None = None
    stop_threshold: float | None = None
    prompt: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    trajectory: bool = False
    drafts: int | None = None  # causal files: draft heads a call may use (0: one token per call)
    selector_options: dict[str, Any] = field(default_factory=dict)
    seed: np.random.SeedSequence = field(default_factory=np.random.SeedSequence)
    layout: Any = None  # set by the Generator for a prompt reader's group of samples (prompt.Layout)
    retries: int = DEFAULT_RETRIES  # a prompt reader's sample that does not keep the prompt is drawn again

    @classmethod
    def checked(cls, n, selector, steps, temperature, stop_threshold, seed, prompt, batch_size, trajectory, drafts,
                options, retries=None) -> Request:
        """Types and ranges of what every format shares; the format checks the rest."""
        if steps is not None:
            steps = positive_int("steps", steps, MAX_STEPS)
        if temperature is not None:
            temperature = temperature_or(temperature, 0.0)
        if stop_threshold is not None:
            stop_threshold = finite_number("stop_threshold", stop_threshold)
            if not 0.0 <= stop_threshold <= 1.0:
                raise ImadaremError(f"stop_threshold must be in [0, 1], got {stop_threshold!r}")
        if drafts is not None and (isinstance(drafts, bool) or not isinstance(drafts, (int, np.integer))
                                   or drafts < 0):
            raise ImadaremError(f"drafts must be an integer >= 0, got {drafts!r}")
        if retries is None:
            retries = DEFAULT_RETRIES
        elif (isinstance(retries, bool) or not isinstance(retries, (int, np.integer))
              or not 0 <= retries <= MAX_RETRIES):
            raise ImadaremError(f"retries must be an integer in [0, {MAX_RETRIES}], got {retries!r}")
        return cls(n=positive_int("n", n), selector=selector, steps=steps, temperature=temperature,
                   stop_threshold=stop_threshold, prompt=prompt,
                   batch_size=DEFAULT_BATCH_SIZE if batch_size is None else positive_int("batch_size", batch_size),
                   trajectory=bool(trajectory), drafts=None if drafts is None else int(drafts),
                   selector_options=dict(options), seed=np.random.SeedSequence(checked_seed(seed)),
                   retries=int(retries))

    def asked(self, **knobs: bool) -> list[str]:
        """The names of the given knobs the caller set (for a format's one-line refusal)."""
        return [name for name, given in knobs.items() if given]
