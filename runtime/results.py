"""What a generate call gives back: samples, per-batch results, and timings.

The format strategies fill a :class:`BatchResult` per batch and report each model call as a
:class:`CallReport`; the Generator turns results into :class:`Sample` objects and calls into
:class:`LoopTimings`. Nothing here knows about formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    steps: int  # model calls this sequence took part in
    edits: list[int]  # tokens edited at each step (empty where a strategy does not count them)
    early_stop: bool
    trajectory: list[TrajectoryStep] | None = None
    kept: bool | None = None  # a prompt reader's check (e.g. the molecule holds the prompt's fragments)
    attempts: int | None = None  # a prompt reader's sample: draws it took (see Generator ``retries``)

    def as_dict(self) -> dict[str, Any]:
        out = {"text": self.text, "ids": self.ids, "steps": self.steps, "edits": self.edits,
               "early_stop": self.early_stop}
        if self.kept is not None:
            out["kept"] = self.kept
        if self.attempts is not None:
            out["attempts"] = self.attempts
        if self.trajectory is not None:
            out["trajectory"] = [vars(s) for s in self.trajectory]
        return out


@dataclass
class CallReport:
    """One model call of a batch: the rows it ran, the seconds inside the model (``session.run`` or the
    PyTorch forward) and the positions per row it ran on (the fed length; 0 where fixed by the graph)."""

    rows: int
    run_seconds: float
    run_length: int


@dataclass
class BatchResult:
    """A finished batch: ``ids`` [b, L] (PAD after EOS and where nothing was placed), model calls per row,
    and optionally edits per step, early-stop flags and trajectories."""

    ids: np.ndarray
    steps: np.ndarray
    edits: list[list[int]] | None = None
    early: np.ndarray | None = None
    trajectories: list[list[TrajectoryStep]] | None = None


@dataclass
class LoopTimings:
    """Where a generate() call spends its time, one entry per model call (for ``imadarem bench``).

    ``run_seconds`` is the time inside the model; the rest of ``step_seconds`` is the loop's own work
    (sampling, the selector, EOS handling, compaction).
    """

    step_seconds: list[float] = field(default_factory=list)
    run_seconds: list[float] = field(default_factory=list)
    active_rows: list[int] = field(default_factory=list)
    run_lengths: list[int] = field(default_factory=list)  # positions the model ran on
    total_seconds: float = 0.0

    def record(self, seconds: float, call: CallReport) -> None:
        self.step_seconds.append(seconds)
        self.run_seconds.append(call.run_seconds)
        self.active_rows.append(call.rows)
        self.run_lengths.append(call.run_length)

    def outside_run_fraction(self) -> float:
        return 1.0 - sum(self.run_seconds) / self.total_seconds if self.total_seconds > 0 else float("nan")


def row_lengths(ids: np.ndarray, eos: int | None, pad: int) -> np.ndarray:
    """Each row's length: up to and including its first EOS, or without its trailing padding (in one
    numpy pass: this runs once per batch)."""
    L = ids.shape[1]
    filled = ids != pad
    ends = np.where(filled.any(1), L - np.argmax(filled[:, ::-1], 1), 0)
    if eos is not None:
        is_eos = ids == eos
        ends = np.where(is_eos.any(1), is_eos.argmax(1) + 1, ends)
    return ends
