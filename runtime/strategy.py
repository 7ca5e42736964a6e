"""What the one Generator asks of a model: a plan per request, a decoding per batch, a step per call.

``Model.plan(request)`` checks a request against the model (one-line errors for what it cannot do) and
returns a :class:`Plan`; ``Plan.start(size, streams)`` returns the :class:`Decoding` of one batch;
``Decoding.step()`` is one model call on the batch's active rows. Each model-file format implements these
(``runtime/formats/``), and so do the PyTorch loops (``imadarem.training.reference``): the Generator's batch
loop (batches, seeds, streaming, timings, cancellation) is the same for all of them.

A decoding whose rows are independent of each other (``refills``) also lets the Generator batch *in
flight*: it hands back the rows whose sample ended (``finished``, ``take``) and starts the next requested
samples in them (``restart``), so every call works on live rows instead of waiting for a batch's longest
sample. A row's sample depends only on its own key, so the samples are the same either way.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
from imadarem.runtime.randomness import SampleStreams
from imadarem.runtime.request import Request
from imadarem.runtime.results import BatchResult, CallReport


class Decoding(abc.ABC):
    """One batch being decoded: its state between calls."""

    @property
    @abc.abstractmethod
    def active(self) -> int:
        """Rows still being decoded (0: the batch is done)."""

    @abc.abstractmethod
    def step(self) -> CallReport:
        """One model call on the active rows, and everything that call decides."""

    @abc.abstractmethod
    def result(self) -> BatchResult:
        """The finished batch."""

    #: whether ``finished``, ``take`` and ``restart`` are implemented (in-flight batching)
    refills = False

    def finished(self) -> np.ndarray:
        """Rows whose sample has ended and whose result is not taken yet (int64 row numbers). A decoding
        whose state lives on a device may report them only every few calls (fewer host round trips)."""
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> BatchResult:
        """The results of the finished ``rows``, in that order; those rows then stay idle until restarted."""
        raise NotImplementedError

    def restart(self, rows: np.ndarray, streams: SampleStreams) -> None:
        """Start the samples of ``streams`` (one per row) in the taken ``rows``: their state afresh, as
        ``Plan.start`` would set it."""
        raise NotImplementedError


class Plan(abc.ABC):
    """A checked request on one model: how each batch starts."""

    #: selectors and other per-run objects are made afresh per batch (they may keep per-run state)
    @abc.abstractmethod
    def start(self, size: int, streams: SampleStreams) -> Decoding:
        """The state of a batch of ``size`` samples, whose randomness is ``streams``."""


class Model(abc.ABC):
    """What the Generator needs of a model: its tokenizer, special ids, length, and plans for requests."""

    tokenizer: Any
    special: Any
    config: dict[str, Any]

    @property
    @abc.abstractmethod
    def max_seq_len(self) -> int: ...

    @abc.abstractmethod
    def plan(self, request: Request) -> Plan:
        """Check ``request`` against this model and return how to decode it (one-line errors)."""
