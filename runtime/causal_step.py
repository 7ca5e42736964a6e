"""A causal model file (format 2) inside the refinement loop: draft-and-verify as a refinement step.

The loop (``generator.Generator._refine``) runs unchanged on a causal file; this module is the state it
keeps instead of the self-conditioning state of a format-1 file (docs/ARCHITECTURE.md, "Format 2").
Every token the loop places on a causal file is a *draft*: a sample from a distribution q that this
module presented (and remembers). Each loop step is one model call:

1. **Feed** the newest exact token and the run of drafts right after it, on top of the KV cache of the
   verified prefix (at the first step: BOS and any prompt prefix).
2. **Verify** the drafts left to right: the main head's output before draft j is its exact conditional
   p_j = softmax((logits + bans) / T); the draft is kept with probability min(1, p_j / q_j), with the
   row's own uniforms (speculative sampling, Leviathan et al. 2023).
3. **Resolve** the first position not verified: a sample of max(0, p − q) after a rejection, of p when
   every draft was kept. So each call commits at least one exact token, and the molecules are
   distributed exactly as left-to-right ancestral sampling at temperature T, whatever the selector.
4. The verified prefix and the resolved token become frozen; every position after it goes back to mask.
   A call verifies at most D drafts (the draft heads' reach, at least 1): drafts a selector placed
   further on go back to mask unverified, so every selector's call costs what the gate's does.
5. **Present** the step to the selector: ``logits`` are the draft heads' predictions for the D positions
   after the resolved token and uniform beyond; ``gate`` is 1 where a draft head predicts (so the gate
   selector drafts exactly there: draft-and-verify), ``critic`` is 1 where nothing is verified. EOS is
   never presented (except in a template's EOS-only slot), so a draft never ends a row unverified;
   EOS comes only from exact samples.

Selectors decide only which drafts to place, i.e. how many tokens a call can commit; none can change
the distribution. A step budget (``--steps``) below what a row needs leaves the loop's last-step rule
to fill what is left, unverified.
"""

from __future__ import annotations

import time

import numpy as np
from imadarem.runtime import rules

#: what a causal file presents to selectors (StepState.logits, .gate, .critic)
PRESENTED_OUTPUTS = ("logits", "gate", "critic")


def distribution(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64 over the last axis (-inf logits get 0); one-hot argmax at T = 0,
    the loop's greedy rule (``sample_proposals``)."""
    z = logits.astype(np.float64)
    if temperature <= rules.GREEDY_TEMPERATURE:
        out = np.zeros_like(z)
        np.put_along_axis(out, z.argmax(-1)[..., None], 1.0, -1)
        return out
    z = z / temperature
    z -= z.max(-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(-1, keepdims=True)
    return z


def draw(probs: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """One token per row of ``probs`` (Gumbel-max on log probs; zero-probability tokens never)."""
    with np.errstate(divide="ignore"):
        return (np.log(probs) + rules.gumbel(uniform.astype(np.float64))).argmax(-1)


class CausalLoopState:
    """The per-batch state of a causal file in the loop: the KV cache and which entries count, how many
    sequence positions each row has verified in it, and the distributions the last presented drafts were
    drawn from. Rows leave with ``keep`` as the loop compacts."""

    causal = True

    def __init__(self, model, n: int, length: int, eos_only: np.ndarray):
        self.model, self.length = model, length
        self.past, self.valid = model.empty_cache(n)
        self.cached = np.zeros(n, dtype=np.int64)  # sequence positions whose keys and values count
        self.started = np.zeros(n, dtype=bool)  # BOS fed
        # the distributions the loop drew the last step's drafts from (their q): the draft window's
        # [n, D, V] starting at position window[row], and one [L, V] for every other position
        self.window_q: np.ndarray | None = None
        self.window = np.zeros(n, dtype=np.int64)
        self.base_q: np.ndarray | None = None
        self.eos_only = eos_only
        self.fed = 0  # tokens per row the last call fed (for timings)
        self._no_eos_bias: np.ndarray | None = None
        self._base_at: float | None = None  # the step temperature base_q was computed at

    def keep(self, rows: np.ndarray) -> None:
        if rows.all():
            return
        self.past, self.valid = self.past[:, :, rows], self.valid[rows]
        self.cached, self.started = self.cached[rows], self.started[rows]
        self.window = self.window[rows]
        if self.window_q is not None:
            self.window_q = self.window_q[rows]

    # -- one step ----------------------------------------------------------------------------------
    def advance(self, x: np.ndarray, frozen: np.ndarray, target_temperature: float, step_temperature: float,
                bias: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], float]:
        """Feed, verify and resolve (the module docstring's 1–4) for the active rows ``x`` / ``frozen``;
        returns the new tokens and frozen mask, the presented outputs and the seconds inside onnxruntime.

        ``target_temperature`` is the distribution sampled (the run's temperature); ``step_temperature``
        the one the loop will draw this step's drafts with (a selector may anneal it), which is their q.
        ``rng`` draws each row's uniforms from its own stream, a fixed amount per step.
        """
        sp, cfg = self.model.special, self.model.typed
        b, L = x.shape
        V, D = cfg.vocab_size, cfg.num_drafts
        rows = np.arange(b)
        feed, n_feed, first_pos, end = self._feed(x, frozen, sp, max(D, 1))
        self.fed = feed[0].shape[1]
        started = time.perf_counter()
        logits, drafts, present = self.model.run(*feed, self.past, self.valid)
        seconds = time.perf_counter() - started
        u = rng.random((b, V + L))
        u_resolve, u_accept = u[:, :V], u[:, V:]

        # 2. verify: fed index k is the token at first_pos + k; its output is the exact conditional of
        # the next position
        r = end.copy()  # the first position not verified
        rejected = np.zeros(b, dtype=bool)
        residual = np.zeros((b, V))
        alive = np.ones(b, dtype=bool)
        for k in range(feed[0].shape[1] - 1):
            j = first_pos + k + 1
            check = alive & (k + 1 < n_feed)
            jc = np.minimum(j, L - 1)
            draft = check & ~frozen[rows, jc]
            if draft.any():
                sel = np.flatnonzero(draft)
                p = distribution(logits[sel, k] + bias[jc[sel]], target_temperature)
                q = self._q(sel, jc[sel])
                tok = x[sel, jc[sel]]
                keep = u_accept[sel, jc[sel]] * q[np.arange(sel.size), tok] < p[np.arange(sel.size), tok]
                bad = sel[~keep]
                if bad.size:
                    res = np.clip(p[~keep] - q[~keep], 0.0, None)
                    total = res.sum(-1, keepdims=True)
                    residual[bad] = np.where(total > 0, res / np.where(total > 0, total, 1.0), p[~keep])
                    rejected[bad], r[bad] = True, j[bad]
                    check[bad] = False
            alive = check

        # 3. resolve position r: the residual after a rejection, else the exact conditional after the run
        complete = r >= L
        if sp.eos is not None:  # the run ended just after a (frozen) EOS
            complete |= ~rejected & (end > 0) & (x[rows, np.clip(end - 1, 0, L - 1)] == sp.eos)
        k_r = np.clip(r - 1 - first_pos, 0, feed[0].shape[1] - 1)  # the fed token just before r
        go = ~complete
        resolved = np.zeros(b, dtype=np.int64)
        if go.any():
            sel = np.flatnonzero(go)
            rc = r[sel]
            dist = distribution(logits[sel, k_r[sel]] + bias[rc], target_temperature)
            dist[rejected[sel]] = residual[sel[rejected[sel]]]
            resolved[sel] = draw(dist, u_resolve[sel])

        # 4. freeze the verified prefix and the resolved token; mask what follows
        pos = np.arange(L)[None, :]
        new_x, new_frozen = x.copy(), frozen.copy()
        new_x[np.flatnonzero(go), r[go]] = resolved[go]
        upto = pos <= r[:, None]
        new_frozen |= upto | complete[:, None]
        new_x[~new_frozen] = sp.mask
        # the cache: entries of fed tokens before r count
        fed_pos = first_pos[:, None] + np.arange(feed[0].shape[1])[None, :]
        counts = (np.arange(feed[0].shape[1])[None, :] < n_feed[:, None]) & (fed_pos < r[:, None])
        self.past, self.valid = present, np.concatenate([self.valid, counts], 1)
        self.cached = np.where(go, r, self.cached)
        self.started[:] = True
        self._compact_cache()

        # 5. present: the draft heads after the resolved token, uniform beyond, EOS only where forced
        no_eos = self._no_eos(L, V, sp.eos)
        shown = np.broadcast_to(no_eos, (b, L, V)).copy()
        gate = np.zeros((b, L), dtype=np.float32)
        window_logits = np.zeros((b, D, V), dtype=np.float32)
        for m in range(D):
            at = r + 1 + m
            ok = go & (at < L)
            if ok.any():
                sel = np.flatnonzero(ok)
                window_logits[sel, m] = drafts[sel, k_r[sel], m]
                shown[sel, at[sel]] = window_logits[sel, m] + no_eos[at[sel]]
                gate[sel, at[sel]] = 1.0
        gate[new_frozen] = 0.0
        self.window = r + 1
        at = np.minimum(self.window[:, None] + np.arange(D)[None, :], L - 1)
        self.window_q = distribution(window_logits + no_eos[at] + bias[at], step_temperature)
        if self._base_at != step_temperature:  # the same for every step of a run unless a selector anneals
            self.base_q, self._base_at = distribution(no_eos + bias, step_temperature), step_temperature
        out = {"logits": shown, "gate": gate, "critic": (~new_frozen).astype(np.float32)}
        return new_x, new_frozen, out, seconds

    def _no_eos(self, L: int, V: int, eos: int | None) -> np.ndarray:
        """[L, V] additive bias: EOS banned from what is presented, except in a template's EOS-only slot
        (built once per batch)."""
        if self._no_eos_bias is None:
            self._no_eos_bias = np.zeros((L, V), dtype=np.float32)
            if eos is not None:
                self._no_eos_bias[~self.eos_only, eos] = -np.inf
        return self._no_eos_bias

    def _q(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """[len(rows), V]: the distribution the draft at ``positions`` was drawn from."""
        q = self.base_q[positions].copy()
        m = positions - self.window[rows]
        inside = (m >= 0) & (m < self.window_q.shape[1])
        q[inside] = self.window_q[rows[inside], m[inside]]
        return q

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


__all__ = ["CausalLoopState", "PRESENTED_OUTPUTS", "distribution", "draw"]
