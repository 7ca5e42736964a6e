"""A causal model file (format 2) inside the refinement loop: draft-and-verify as a refinement step.

The loop (``generator.Generator._refine``) runs unchanged on a causal file; this module is the state it
keeps instead of the self-conditioning state of a format-1 file (docs/ARCHITECTURE.md, "Format 2").
Every token the loop places on a causal file is a *draft*. Each sample has its own sampling noise, a pure
function of (sample, position, token) (``rules.counter_gumbel``), and each loop step is one model call:

1. **Feed** the newest exact token and the run of drafts right after it, on top of the KV cache of the
   verified prefix (at the first step: BOS and any prompt prefix).
2. **Sample** the exact token of every position the call reaches: argmax((logits + bans) / T + g), with
   g the noise of that position (``rules.coupled_sample``); the output after fed token k is the main
   head's conditional of the position after it.
3. **Verify** the drafts left to right: a draft is kept iff it *is* the exact token of its position.
   The first position not verified takes its exact token. So every call commits at least one exact token,
   and every molecule is the one the left-to-right decoder (``causal.CausalGenerator``) samples with the
   same seed, token for token, whatever the selector and the batch: the selector decides only how many
   calls it takes.
4. The verified prefix and the resolved token become frozen; every position after it goes back to mask.
   A call verifies at most D drafts (the draft heads' reach, at least 1): drafts a selector placed
   further on go back to mask unverified, so every selector's call costs what the gate's does.
5. **Present** the step to the selector: ``logits`` are the draft heads' predictions for the D positions
   after the resolved token and uniform beyond; ``proposals`` are drawn from them with each position's
   own noise, the noise its exact token will be drawn with, so a draft is right as often as the draft
   head and the main head agree (this coupling is as good as speculative sampling's acceptance test on
   the bundled model: 13.4 calls per molecule against 13.3); ``gate`` is 1 where a draft head predicts
   (so the gate selector drafts exactly there: draft-and-verify), ``critic`` is 1 where nothing is
   verified. EOS is never presented (except in a template's EOS-only slot), so a draft never ends a row;
   EOS comes only from exact tokens.

A step budget (``--steps``) below what a row needs leaves the loop's last-step rule to fill what is
left, unverified.
"""

from __future__ import annotations

import time

import numpy as np
from imadarem.runtime import rules

#: what a causal file presents to selectors (StepState.logits, .gate, .critic)
PRESENTED_OUTPUTS = ("logits", "gate", "critic")


def position_noise(keys: np.ndarray, length: int, vocab: int) -> np.ndarray:
    """[B, length, vocab] Gumbel noise of every position of each sample (computed once per batch)."""
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (keys.shape[0], length))
    return rules.counter_gumbel(keys, positions, vocab)


class CausalLoopState:
    """The per-batch state of a causal file in the loop: the KV cache and which entries count, how many
    sequence positions each row has verified in it, and each row's sampling noise. Rows leave with
    ``keep`` as the loop compacts."""

    causal = True

    def __init__(self, model, n: int, length: int, eos_only: np.ndarray, keys: np.ndarray):
        self.model, self.length = model, length
        self.past, self.valid = model.empty_cache(n)
        self.cached = np.zeros(n, dtype=np.int64)  # sequence positions whose keys and values count
        self.started = np.zeros(n, dtype=bool)  # BOS fed
        self.noise = position_noise(keys, length, model.typed.vocab_size)
        self.eos_only = eos_only
        self.fed = 0  # tokens per row the last call fed (for timings)
        self._base: np.ndarray | None = None
        self._tempered_noise: np.ndarray | None = None
        self._tempered_at: float | None = None

    def keep(self, rows: np.ndarray) -> None:
        if rows.all():
            return
        self.past, self.valid = self.past[:, :, rows], self.valid[rows]
        self.cached, self.started, self.noise = self.cached[rows], self.started[rows], self.noise[rows]
        if self._tempered_noise is not None:
            self._tempered_noise = self._tempered_noise[rows]

    # -- one step ----------------------------------------------------------------------------------
    def advance(self, x: np.ndarray, frozen: np.ndarray, target_temperature: float, step_temperature: float,
                bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], float]:
        """Feed, sample, verify and resolve (the module docstring's 1–4) for the active rows ``x`` /
        ``frozen``; returns the new tokens and frozen mask, what the selector is shown (with the
        ``proposals`` drawn at ``step_temperature``, the temperature a selector may anneal) and the seconds
        inside onnxruntime. ``target_temperature`` is the run's: the one every exact token is drawn at."""
        sp, cfg = self.model.special, self.model.typed
        b, L = x.shape
        V, D = cfg.vocab_size, cfg.num_drafts
        rows = np.arange(b)
        feed, n_feed, first_pos, end = self._feed(x, frozen, sp, max(D, 1))
        width = feed[0].shape[1]
        self.fed = width
        started = time.perf_counter()
        logits, drafts, present = self.model.run(*feed, self.past, self.valid)
        seconds = time.perf_counter() - started

        # 2. the exact token of the position after each fed token
        after = np.clip(first_pos[:, None] + 1 + np.arange(width)[None, :], 0, L - 1)  # [b, width]
        noise = np.take_along_axis(self.noise, after[:, :, None], 1)
        exact = rules.coupled_sample(logits + bias[after], target_temperature, noise)  # [b, width]

        # 3. verify: fed token k (k >= 1) sits at position first_pos + k; frozen ones (prompt literals)
        # are verified for free, drafts iff they are the exact token there
        k = np.arange(1, width)[None, :]
        at = np.clip(first_pos[:, None] + k, 0, L - 1)
        in_run = k < n_feed[:, None]
        kept = frozen[rows[:, None], at] | (x[rows[:, None], at] == exact[:, :-1])
        failed = in_run & ~kept
        rejected = failed.any(1)
        first_failure = failed.argmax(1) if width > 1 else np.zeros(b, dtype=np.int64)
        r = np.where(rejected, first_pos + 1 + first_failure, end)  # the first position not verified
        complete = r >= L
        if sp.eos is not None:  # the run ended just after a (frozen) EOS
            complete |= ~rejected & (end > 0) & (x[rows, np.clip(end - 1, 0, L - 1)] == sp.eos)
        go = ~complete
        k_r = np.clip(r - 1 - first_pos, 0, width - 1)  # the fed token just before r

        # 4. commit the exact token at r, freeze the verified prefix and it; mask what follows
        new_x, new_frozen = x.copy(), frozen.copy()
        new_x[rows[go], r[go]] = exact[rows[go], k_r[go]]
        pos = np.arange(L)[None, :]
        new_frozen |= (pos <= r[:, None]) | complete[:, None]
        new_x[~new_frozen] = sp.mask
        # the cache: entries of fed tokens before r count
        fed_pos = first_pos[:, None] + np.arange(width)[None, :]
        counts = (np.arange(width)[None, :] < n_feed[:, None]) & (fed_pos < r[:, None])
        self.past, self.valid = present, np.concatenate([self.valid, counts], 1)
        self.cached = np.where(go, r, self.cached)
        self.started[:] = True
        self._compact_cache()

        # 5. present: the draft heads after the resolved token, uniform beyond, EOS only where forced
        shown = np.broadcast_to(self._presented_bias(bias, sp.eos), (b, L, V)).copy()
        gate = np.zeros((b, L), dtype=np.float32)
        for m in range(D):
            at = r + 1 + m
            ok = go & (at < L)
            if ok.any():
                sel = rows[ok]
                shown[sel, at[sel]] += drafts[sel, k_r[sel], m]
                gate[sel, at[sel]] = 1.0
        gate[new_frozen] = 0.0
        proposals = rules.coupled_argmax(shown, self._tempered(step_temperature))
        out = {"logits": shown, "proposals": proposals, "gate": gate, "critic": (~new_frozen).astype(np.float32)}
        return new_x, new_frozen, out, seconds

    def _presented_bias(self, bias: np.ndarray, eos: int | None) -> np.ndarray:
        """[L, V]: the run's bans plus EOS banned from what is presented, except in a template's EOS-only
        slot (built once per batch: the run's bans do not change between steps)."""
        if self._base is None:
            self._base = bias.copy()
            if eos is not None:
                self._base[~self.eos_only, eos] = -np.inf
        return self._base

    def _tempered(self, temperature: float) -> np.ndarray:
        """T g over every row, position and token, computed once per step temperature (a selector may
        anneal it) and compacted with the rows."""
        if self._tempered_at != temperature:
            self._tempered_noise, self._tempered_at = rules.tempered_noise(self.noise, temperature), temperature
        return self._tempered_noise

    def _feed(self, x: np.ndarray, frozen: np.ndarray, sp, window: int
              ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """The call's inputs: per row BOS (first call only), then the tokens from the first uncached
        position up to the first mask, just after an EOS, or before the draft beyond the first ``window``
        (the draft heads' reach: a call verifies at most that many drafts, so a selector that fills every
        mask costs what the gate does; the drafts beyond go back to mask). Also how many each row feeds, the
        sequence position of fed index 0 (-1 for BOS) and where the run ends."""
        b, L = x.shape
        pos = np.arange(L)[None, :]
        after = pos >= self.cached[:, None]
        stop = after & (x == sp.mask)
        drafts = after & ~frozen & (x != sp.mask)
        stop |= drafts & (np.cumsum(drafts, 1) > window)
        if sp.eos is not None:
            stop |= (pos > self.cached[:, None]) & (np.roll(x, 1, axis=1) == sp.eos)
        end = np.where(stop.any(1), stop.argmax(1), L)
        bos = (~self.started).astype(np.int64)
        n_feed = end - self.cached + bos
        first_pos = self.cached - bos
        M = int(n_feed.max())
        seq = first_pos[:, None] + np.arange(M)[None, :]
        tokens = np.take_along_axis(x, np.clip(seq, 0, L - 1), 1)
        tokens = np.where(seq < 0, sp.mask, tokens)  # BOS is the mask id
        tokens = np.where(np.arange(M)[None, :] < n_feed[:, None], tokens, sp.pad)
        positions = np.clip(seq + 1, 0, L)
        return (tokens.astype(np.int64), positions.astype(np.int64)), n_feed, first_pos, end

    def _compact_cache(self) -> None:
        """Drop cache entries that count for no row once they are most of the cache (rejected drafts and
        padding pile up), keeping at least one entry; positions are inputs, so order does not matter."""
        width = self.valid.shape[1]
        need = int(self.valid.sum(1).max())
        if width <= 2 * max(need, 1) + 8:
            return
        keep = max(need, 1)
        order = np.argsort(~self.valid, axis=1, kind="stable")[:, :keep]  # valid entries first, in order
        self.valid = np.take_along_axis(self.valid, order, 1)
        layers, two, b, heads, _, head_dim = self.past.shape
        idx = np.broadcast_to(order[None, None, :, None, :, None], (layers, two, b, heads, keep, head_dim))
        self.past = np.take_along_axis(self.past, idx, 4)


__all__ = ["CausalLoopState", "PRESENTED_OUTPUTS", "position_noise"]
