"""What the one Generator asks of a model: a plan per request, a decoding per batch, a step per call.

``Model.plan(request)`` checks a request against the model (one-line errors for what it cannot do) and
returns a :class:`Plan`; ``Plan.start(size, streams)`` returns the :class:`Decoding` of one batch;
``Decoding.step()`` is one model call on the batch's active rows. Each model-file format implements these
(``runtime/formats/``), and so do the PyTorch loops (``imadarem.training.reference``): the Generator's batch
loop (batches, seeds, streaming, timings, cancellation) is the same for all of them.
"""

from __future__ import annotations

import abc
from typing import Any

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
