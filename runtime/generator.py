"""The Generator: one batch loop over any model (docs/ARCHITECTURE.md, "The Generator").

A request is checked once (``Request``; then the model's format checks the rest and returns a ``Plan``).
The request runs in batches of ``batch_size``, each yielded when it is done, so memory is bounded by the
batch, never by ``n``. Sample i of a request seeded s draws only from its own randomness
(``SampleStreams(s, i)``), so the samples depend on neither ``n`` nor the batch size. Per batch the loop is:

    decoding = plan.start(size, streams)       # the format's state for the batch
    while decoding.active:                     # rows left
        call = decoding.step()                 # one model call: the format's strategy does the work
    samples = decoding.result()                # ids, calls per row, edits, ...

A decoding whose rows are independent (``Decoding.refills``, e.g. decode files) runs *in flight* instead:
the rows whose sample ended are taken after each call and the next samples start in them, so no call
waits on a batch's longest sample; the samples, and their order, are those of whole batches.

A prompt a plugin's reader accepts (``prompt_reader``; e.g. SMILES fragments with attachment points) gives
each sample its own layout, drawn from the sample's own generator; samples with equal layouts run together,
group by group, and are yielded in index order once all are done; each is checked by the reader (``kept``).

Cancellation (``cancel``, a ``threading.Event``) is checked between model calls. A Generator holds no
per-call state, so one instance serves many threads at once.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.formats import open_model
from imadarem.runtime.prompt import layout_key
from imadarem.runtime.randomness import SampleStreams
from imadarem.runtime.registry import prompt_reader_for
from imadarem.runtime.request import Request
from imadarem.runtime.results import BatchResult, LoopTimings, Sample, TrajectoryStep, row_lengths
from imadarem.runtime.selector import Selector
from imadarem.runtime.strategy import Model

#: a retried sample's virtual index is i + attempt * RETRY_STRIDE (beyond any request's n)
RETRY_STRIDE = 1 << 40


class Cancelled(ImadaremError):
    """The request was cancelled (its ``cancel`` event was set) between two model calls."""


class Generator:
    """Generate sequences from a model file (any format) with numpy + onnxruntime."""

    def __init__(self, model: str | os.PathLike | Model | None = None, provider: str = "cpu",
                 threads: int | None = None):
        """``model``: a model file's path, a bundled model's name, an opened :class:`Model` (e.g. a PyTorch
        strategy from ``imadarem.training.reference``), or None for the bundled default model."""
        self.model = model if isinstance(model, Model) else open_model(model, provider, threads)
        self.provider = provider

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def special(self):
        return self.model.special

    @property
    def config(self) -> dict[str, Any]:
        return self.model.config

    # -- public API ----------------------------------------------------------------------------
    def generate(self, n: int = 1, selector: str | Selector | None = None, steps: int | None = None,
                 temperature: float | None = None, stop_threshold: float | None = None, seed: int | None = None,
                 prompt: str | None = None, batch_size: int | None = None, trajectory: bool = False,
                 timings: LoopTimings | None = None, decode: bool = True, drafts: int | None = None,
                 cancel: threading.Event | None = None, retries: int | None = None,
                 **selector_options: Any) -> list[Sample]:
        """Generate ``n`` sequences (a list of :meth:`iter_generate`'s samples); every knob left None
        defaults from the model.

        ``selector``: a selector plugin's name or instance (default: the model's, ``gate`` for the bundled
        model); ``steps``: a step budget; ``drafts`` (causal files): draft heads a call may use, 0 for one
        token per call; ``timings``, when given, is filled with per-call wall and model times;
        ``decode=False`` leaves ``Sample.text`` None (ids only); ``retries`` (a prompt reader's prompts, e.g.
        fragments): how many times a sample that does not keep the prompt is drawn again (default 3).
        """
        return list(self.iter_generate(n, selector, steps, temperature, stop_threshold, seed, prompt, batch_size,
                                       trajectory, timings, decode, drafts, cancel, retries, **selector_options))

    def iter_generate(self, n: int = 1, selector: str | Selector | None = None, steps: int | None = None,
                      temperature: float | None = None, stop_threshold: float | None = None,
                      seed: int | None = None, prompt: str | None = None, batch_size: int | None = None,
                      trajectory: bool = False, timings: LoopTimings | None = None, decode: bool = True,
                      drafts: int | None = None, cancel: threading.Event | None = None,
                      retries: int | None = None, **selector_options: Any) -> Iterator[Sample]:
        """The samples of :meth:`generate`, yielded batch by batch as each batch finishes.

        The same seed gives the same samples for any ``n`` (a smaller ``n`` gives a prefix) and any
        ``batch_size``. The arguments are checked here, before the first batch runs.
        """
        request, runs, reader = self._plan(n, selector, steps, temperature, stop_threshold, seed, prompt, batch_size,
                                           trajectory, drafts, selector_options, retries)
        if reader is None:
            results = self._batches(request, runs[0][0], timings, cancel, None)
            return (sample for result in results for sample in self.samples(result, decode))
        return self._read_samples(request, runs, reader, timings, cancel, decode)

    def iter_results(self, n: int = 1, selector: str | Selector | None = None, steps: int | None = None,
                     temperature: float | None = None, stop_threshold: float | None = None,
                     seed: int | None = None, prompt: str | None = None, batch_size: int | None = None,
                     trajectory: bool = False, timings: LoopTimings | None = None, drafts: int | None = None,
                     cancel: threading.Event | None = None, **selector_options: Any) -> Iterator[BatchResult]:
        """The loop's own output, batch by batch: ids [b, L] and calls per row, before any Sample is
        built (what ``imadarem bench`` times, as it times the PyTorch loops)."""
        request, runs, _ = self._plan(n, selector, steps, temperature, stop_threshold, seed, prompt, batch_size,
                                      trajectory, drafts, selector_options)
        return (result for plan, indices in runs for result in self._batches(request, plan, timings, cancel, indices))

    # -- the loop --------------------------------------------------------------------------------
    def _plan(self, n, selector, steps, temperature, stop_threshold, seed, prompt, batch_size, trajectory, drafts,
              options, retries=None):
        """The checked request, its runs [(plan, sample indices or None for all)] and its prompt reader."""
        request = Request.checked(n, selector, steps, temperature, stop_threshold, seed, prompt, batch_size,
                                  trajectory, drafts, options, retries)
        reader = prompt_reader_for(request.prompt, self.tokenizer)
        if reader is None:
            return request, [(self.model.plan(request), None)], None
        return request, self._groups(request, reader, range(request.n)), reader

    def _groups(self, request: Request, reader, indices) -> list[tuple]:
        """Runs [(plan, indices)] of the samples ``indices``, grouped by the layout each draws from its own
        generator (so a sample's layout is the same for any n)."""
        max_len = int(self.config["max_seq_len"])
        groups: dict[tuple, tuple] = {}
        for i in indices:
            layout = reader.layout(request.prompt, self.tokenizer, self.special, max_len,
                                   SampleStreams.of_layout(request.seed, i))
            groups.setdefault(layout_key(layout), (layout, []))[1].append(i)
        return [(self.model.plan(dataclasses.replace(request, layout=layout)), members)
                for layout, members in groups.values()]

    def _read_samples(self, request: Request, runs, reader, timings, cancel, decode: bool) -> Iterator[Sample]:
        """A prompt reader's samples: its groups run one after another, every sample is checked against the
        prompt, and one that does not keep it is drawn again (``request.retries`` times at most) as sample
        ``i + attempt * RETRY_STRIDE``: a new layout and new randomness that depend only on (seed, i,
        attempt). A sample reports the calls of all its attempts. Yielded in index order."""
        done: dict[int, Sample] = {}
        for attempt in range(request.retries + 1):
            if attempt:
                failed = [i for i, s in sorted(done.items()) if s.kept is False]
                if not failed:
                    break
                runs = self._groups(request, reader, [i + attempt * RETRY_STRIDE for i in failed])
            for plan, indices in runs:
                first = 0
                for result in self._batches(request, plan, timings, cancel, indices):
                    for sample in self.samples(result, True):
                        i = indices[first] % RETRY_STRIDE
                        kept = reader.keeps(request.prompt, sample.text)
                        calls = sample.steps + (done[i].steps if attempt else 0)
                        done[i] = dataclasses.replace(sample, kept=kept, steps=calls, attempts=attempt + 1,
                                                      text=sample.text if decode else None)
                        first += 1
        return iter([done[i] for i in range(request.n)])

    def _batches(self, request: Request, plan, timings: LoopTimings | None, cancel: threading.Event | None,
                 indices: list[int] | None) -> Iterator[BatchResult]:
        n, batch = (request.n if indices is None else len(indices)), request.batch_size

        def streams(first: int, count: int) -> SampleStreams:  # of the run's samples first .. first + count - 1
            return (SampleStreams(request.seed, first, count) if indices is None
                    else SampleStreams.at(request.seed, indices[first : first + count]))

        first = 0
        while first < n:
            started = time.perf_counter()
            count = min(batch, n - first)
            decoding = plan.start(count, streams(first, count))
            if decoding.refills and self.in_flight and n - first > count:
                yield from self._in_flight(decoding, streams, first, count, n, batch, timings, cancel, started)
                return
            while decoding.active:
                self._call(decoding, timings, cancel)
            result = decoding.result()
            if timings is not None:
                timings.total_seconds += time.perf_counter() - started
            yield result
            first += count

    #: in-flight batching where the decoding allows it (``Decoding.refills``); off: whole batches (same samples)
    in_flight = True

    def _in_flight(self, decoding, streams, first: int, count: int, n: int, batch: int,
                   timings: LoopTimings | None, cancel: threading.Event | None, started: float
                   ) -> Iterator[BatchResult]:
        """Samples ``first`` .. n - 1 on one batch of rows: after each call the rows whose sample ended are
        taken and the next samples start in them, so no call runs on rows that only wait for the batch's
        longest sample. Results come back in sample order, ``batch`` at a time (the last part shorter): a
        finished sample waits only for the earlier ones still running."""
        sample_of_row = np.arange(first, first + count)  # the sample each row holds
        admitted = first + count
        ready: dict[int, tuple[np.ndarray, int]] = {}
        out = first  # the next sample to yield
        while True:
            rows = decoding.finished()
            if rows.size:
                taken = decoding.take(rows)
                for j, row in enumerate(rows.tolist()):
                    ready[int(sample_of_row[row])] = (taken.ids[j], int(taken.steps[j]))
                k = min(rows.size, n - admitted)
                if k:
                    decoding.restart(rows[:k], streams(admitted, k))
                    sample_of_row[rows[:k]] = np.arange(admitted, admitted + k)
                    admitted += k
                while out + batch <= n and all(i in ready for i in range(out, out + batch)):
                    yield self._ready_part(ready, out, batch, timings, started)
                    out += batch
                    started = time.perf_counter()
            if not decoding.active:
                if out == n:
                    return
                if len(ready) == n - out:  # every sample ended: the last, shorter part
                    yield self._ready_part(ready, out, n - out, timings, started)
                    return
                continue  # rows ended without a call (a first token that is EOS): take and restart them
            self._call(decoding, timings, cancel)

    @staticmethod
    def _ready_part(ready: dict, first: int, count: int, timings: LoopTimings | None, started: float) -> BatchResult:
        parts = [ready.pop(i) for i in range(first, first + count)]
        if timings is not None:
            timings.total_seconds += time.perf_counter() - started
        return BatchResult(np.stack([ids for ids, _ in parts]), np.array([calls for _, calls in parts], np.int64))

    @staticmethod
    def _call(decoding, timings: LoopTimings | None, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        call_started = time.perf_counter()
        call = decoding.step()
        if timings is not None:
            timings.record(time.perf_counter() - call_started, call)

    def samples(self, result: BatchResult, decode: bool = True) -> list[Sample]:
        """A batch's rows as Samples: each up to and including its first EOS, or without its padding."""
        sp = self.special
        lengths = row_lengths(result.ids, sp.eos, sp.pad).tolist()
        rows, steps = result.ids.tolist(), result.steps.tolist()
        text = self.tokenizer.decode if decode else None
        out = []
        for i, (row, k) in enumerate(zip(rows, lengths)):
            ids = row[:k]
            out.append(Sample(text(ids) if text else None, ids, int(steps[i]),
                              result.edits[i] if result.edits is not None else [],
                              bool(result.early[i]) if result.early is not None else False,
                              result.trajectories[i] if result.trajectories is not None else None))
        return out


__all__ = ["Cancelled", "Generator", "LoopTimings", "Sample", "TrajectoryStep"]
