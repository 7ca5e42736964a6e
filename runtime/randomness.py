"""Randomness per sample: sample ``i`` of a request seeded ``s`` draws only from its own stream.

A request's samples are generated in batches, and rows leave a batch as they finish, so one generator
shared by the batch would hand each sample different numbers whenever ``batch_size``, ``n`` or another
row's early stop changed. Here every sample index owns a generator seeded with
``SeedSequence(s, spawn_key=(i,))`` (numpy's own way of deriving independent child streams), and every
per-position draw is made row by row from those generators. So ``-n 4`` is the prefix of ``-n 8`` and
``--batch-size`` changes nothing but speed and memory. The numpy loop and the PyTorch reference loop
draw through this one module, which is why they sample the same tokens for the same seed.

Causal files (format 2) draw no stream: their sampling noise is a pure function of (sample key, position,
token), ``rules.counter_uniforms``, which a decode graph also computes on a GPU. A sample's key comes from
the request's seed and the sample's index (``SampleStreams.keys``), so the same guarantees hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
from imadarem.runtime import rules

__all__ = ["RowRandom", "SampleStreams"]


class SampleStreams:
    """The generators of samples ``first .. first + count - 1`` of a request seeded ``root``, or of the
    samples ``indices`` (a prompt reader's group of samples that share a layout)."""

    def __init__(self, root: np.random.SeedSequence, first: int, count: int, indices: Sequence[int] | None = None):
        self.root = root
        self.indices = np.arange(first, first + count) if indices is None else np.asarray(indices, dtype=np.int64)
        self.first, self.count = int(self.indices[0]) if len(self.indices) else first, len(self.indices)

    @cached_property
    def generators(self) -> list[np.random.Generator]:
        """One generator per sample, made on first use (a decode graph never needs them)."""
        root = self.root
        return [np.random.default_rng(np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, i)))
                for i in self.indices.tolist()]

    @cached_property
    def shared(self) -> np.random.Generator:
        """For selectors that call a Generator method RowRandom does not list (per batch, not per sample);
        its two-entry key is never a sample's one-entry key."""
        root = self.root
        return np.random.default_rng(np.random.SeedSequence(root.entropy,
                                                            spawn_key=(*root.spawn_key, self.first, self.count)))

    def keys(self) -> np.ndarray:
        """[count] int64 counter keys of these samples (``rules.sample_keys``), from two words of the
        request's own seed sequence (no sample's stream is drawn from)."""
        words = self.root.generate_state(2)
        return rules.keys_at((int(words[0]), int(words[1])), self.indices)

    @staticmethod
    def of_layout(root: np.random.SeedSequence, index: int) -> np.random.Generator:
        """The generator a prompt reader draws sample ``index``'s layout with (a three-entry key: never a
        sample's stream nor a batch's shared one)."""
        return np.random.default_rng(np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, index, 0, 1)))

    @classmethod
    def at(cls, root: np.random.SeedSequence, indices: Sequence[int]) -> SampleStreams:
        """The streams of the samples ``indices`` (a prompt reader's group of samples sharing a layout)."""
        return cls(root, 0, 0, indices)

    @classmethod
    def for_request(cls, seed: int | None, first: int, count: int) -> SampleStreams:
        return cls(np.random.SeedSequence(seed), first, count)

    def uniforms(self, rows: Sequence[int] | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """[len(rows), *shape] float32 uniforms in [0, 1), row j from the generator of sample rows[j]."""
        out = np.empty((len(rows), *shape), dtype=np.float32)
        for j, row in enumerate(rows):
            self.generators[int(row)].random(shape, dtype=np.float32, out=out[j])
        return out

    def for_rows(self, rows: Sequence[int] | np.ndarray) -> RowRandom:
        return RowRandom(self, np.asarray(rows))


class RowRandom:
    """``StepState.rng``: a numpy-Generator-like object whose draws of shape ``(B, ...)`` come row by row
    from each active sample's own stream, so a selector's randomness, like the sampler's, does not depend
    on the batch it runs in. Methods beyond those listed here fall through to one request-level generator:
    they work, but their numbers then depend on the batch."""

    def __init__(self, streams: SampleStreams, rows: np.ndarray):
        self._streams, self._rows = streams, rows

    def _per_row(self, size, draw) -> np.ndarray:
        size = (size,) if isinstance(size, (int, np.integer)) else tuple(size or ())
        if not size or size[0] != len(self._rows):
            raise ValueError(f"StepState.rng draws per sequence: size must start with the batch size "
                             f"{len(self._rows)}, got {size or None}")
        rows = [draw(self._streams.generators[int(r)], size[1:]) for r in self._rows]
        return np.stack(rows) if rows else np.empty(size)

    def random(self, size=None, dtype=np.float64) -> np.ndarray:
        return self._per_row(size, lambda g, s: g.random(s, dtype=dtype))

    def uniform(self, low=0.0, high=1.0, size=None) -> np.ndarray:
        return self._per_row(size, lambda g, s: g.uniform(low, high, s))

    def standard_normal(self, size=None, dtype=np.float64) -> np.ndarray:
        return self._per_row(size, lambda g, s: g.standard_normal(s, dtype=dtype))

    def normal(self, loc=0.0, scale=1.0, size=None) -> np.ndarray:
        return self._per_row(size, lambda g, s: g.normal(loc, scale, s))

    def gumbel(self, loc=0.0, scale=1.0, size=None) -> np.ndarray:
        return self._per_row(size, lambda g, s: g.gumbel(loc, scale, s))

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False) -> np.ndarray:
        return self._per_row(size, lambda g, s: g.integers(low, high, s, dtype=dtype, endpoint=endpoint))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._streams.shared, name)
