"""Draft-and-verify for a block refine model (``objective: "block"``): its left-to-right samples in fewer calls.

Why: a block model's prediction at the first mask of a state whose prefix is committed is its left-to-right
conditional, and its predictions at the other masks of that block are marginals, which make good drafts
where the tokens hardly depend on each other. So the causal format's draft-and-verify (``formats/causal.py``)
works here without draft heads: sample i has its own noise per position (``rules.position_noise``), every
committed token is the *exact* token of its position, argmax(logits + bans + T g), drawn from the state
where everything before it is committed, and a draft is kept iff it is that token. The molecules are the
ones one exact token per call gives (``drafts=0``), token for token, for any batch size; drafts change only
the number of calls.

One call (:class:`BlockVerifyStep`), per row with first unverified position u_0, drafts at the next
non-frozen positions u_0 .. u_{m-1} (m <= ``drafts``; drafts after a mask, or beyond the m-th, go back to
mask) runs the states r_0 .. r_m as rows of one batch (r_k: the verified tokens and prompt literals, the
first k drafts, masks elsewhere), takes the exact token of u_k from r_k, keeps the leading drafts that equal
theirs, commits the exact token at the first position not kept and freezes everything up to it, and
presents to the selector r_a's predictions at the positions after it in its block (EOS never drafted), with ``gate``
there r_a's acceptance gate when the model has one (training/acceptance_gate.py: the chance the draft is kept), else
1: so the gate selector places the drafts likely to be kept and saves the rows of the others. The price is up to m +
1 rows a molecule per call instead of one; the calls are fewer (on the bundled ``refine``, n = 200: 16.2 calls and
44.5 rows a molecule with the gate selector, 15.6 and 47.8 drafting every presented position, against 36 and 36 one
token per call).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.prompt import Layout
from imadarem.runtime.refinement import ModelStep, Shown


class ZeroCond:
    """The ``cond`` input of a block model: always zeros (the block objective never self-conditions, so the
    trained ``self_cond`` projection never saw anything else). One buffer, grown once and viewed per call, so a
    call of any rows and window allocates nothing."""

    def __init__(self, hidden: int):
        self.hidden, self.zeros = hidden, np.zeros(0, dtype=np.float32)

    def __call__(self, rows: int, length: int) -> np.ndarray:
        size = rows * length * self.hidden
        if self.zeros.size < size:
            self.zeros = np.zeros(size, dtype=np.float32)
        return self.zeros[:size].reshape(rows, length, self.hidden)


def run_by_window(run: Callable[[np.ndarray, int], dict[str, np.ndarray]], windows: np.ndarray,
                  split: bool) -> dict[str, np.ndarray]:
    """One call of a block model whose rows need ``windows`` leading positions (rules.row_windows): ``run(rows,
    cut)`` runs those rows over their first ``cut`` positions. With ``split`` (a CPU, where a run costs its rows x
    window) the rows may go in up to three runs (rules.window_groups), stitched back to the widest window, the positions
    a row did not run zero-filled: they lie in later, all-mask blocks, which no selector reads on a block model
    and which the row's own window hides from every position it ran."""
    widest = int(windows.max(initial=0))
    groups = rules.window_groups(windows) if split else []
    if len(groups) < 2:
        return run(np.arange(windows.size), widest)
    stitched: dict[str, np.ndarray] = {}
    for rows, cut in groups:
        for name, value in run(rows, cut).items():
            per_position = value.ndim >= 2 and value.shape[1] == cut
            if name not in stitched:
                shape = (windows.size, widest, *value.shape[2:]) if per_position else (windows.size, *value.shape[1:])
                stitched[name] = np.zeros(shape, dtype=value.dtype)
            if per_position:
                stitched[name][rows, :cut] = value
            else:
                stitched[name][rows] = value
    return stitched


def open_positions(frozen: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's open (unfrozen) positions in order: ``rank`` [B, L] (1, 2, ... along them, 0 where frozen) and
    ``U`` [B, count], U[:, k] the row's k-th open position u_k (L when it has fewer)."""
    L = frozen.shape[1]
    open_ = ~frozen
    rank = np.cumsum(open_, 1) * open_
    U = np.stack([np.where((rank == k + 1).any(1), (rank == k + 1).argmax(1), L) for k in range(count)], 1)
    return rank, U


class BlockVerifyStep(ModelStep):
    """The per-batch state of draft-and-verify on a block refine file: each row's noise; the rest lives in
    the loop's tokens and frozen mask (verified positions are frozen, drafts are unfrozen tokens)."""

    def __init__(self, model, n: int, layout: Layout, temperature: float, bias: np.ndarray, keys: np.ndarray,
                 drafts: int, block: int):
        self.model, self.temperature, self.bias, self.window, self.block = model, temperature, bias, drafts, block
        self.noise = rules.position_noise(keys, layout.length, model.vocab_size)
        self.tempered = rules.tempered_noise(self.noise, temperature)
        presented = bias.copy()
        if model.special.eos is not None:  # EOS is only ever an exact token, except in a template's EOS-only slot
            presented[~layout.eos_only, model.special.eos] = -np.inf
        self.presented_bias = presented
        self.cond = ZeroCond(model.hidden_size)
        # an acceptance gate (training/acceptance_gate.py) says how likely each presented draft is kept
        self.gated = model.config.get("gate_target") == "acceptance" and "gate" in model.outputs
        # the positions whose predictions the last call presented: a draft placed anywhere else (a selector's
        # forced commit past the end of a block, where no prediction was shown) would only waste a row
        self.offered = np.zeros((n, layout.length), dtype=bool)

    def keep(self, rows: np.ndarray) -> None:
        if not rows.all():
            self.noise, self.tempered, self.offered = self.noise[rows], self.tempered[rows], self.offered[rows]

    def run(self, x, fz, t, num_steps, step_temperature, rows) -> Shown:
        sp, W = self.model.special, self.window
        b, L = x.shape
        idx = np.arange(b)
        pos = np.arange(L)[None, :]
        open_ = ~fz
        rank, U = open_positions(fz, W + 1)  # along each row's open (unverified) positions
        at_u = np.take_along_axis(x, np.minimum(U, L - 1), 1)
        holds = (U < L) & (at_u != sp.mask) & np.take_along_axis(self.offered, np.minimum(U, L - 1), 1)
        m = np.cumprod(holds[:, :W], 1).sum(1) if W else np.zeros(b, dtype=np.int64)  # the leading drafts

        # the states r_0 .. r_m of every row, one batch: r_k keeps the first k drafts, masks the other open ones
        counts = m + 1
        owner = np.repeat(idx, counts)
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        k = np.arange(int(counts.sum())) - np.repeat(start, counts)
        keep = fz[owner] | (open_[owner] & (rank[owner] <= k[:, None]))
        states = np.where(keep, x[owner], sp.mask)
        target = U[owner, k]
        windows = rules.row_windows(states, target, sp.mask, sp.pad, self.block)
        cut = int(windows.max(initial=min(L, self.block)))
        started = time.perf_counter()
        out = run_by_window(lambda s, w: self._logits(states[s, :w]), windows, self.model.provider != "cuda")
        logits, gates = out["logits"], out.get("gate")
        seconds = time.perf_counter() - started

        # the exact token of each state's target position, from the state where everything before it counts
        at = np.minimum(target, cut - 1)
        exact = rules.coupled_argmax(logits[np.arange(k.size), at] + self.bias[at], self.tempered[owner, at])
        # verify: the leading drafts that are their exact tokens
        if W:
            ks = np.arange(W)[None, :]
            pending = ks < m[:, None]
            rows_k = np.minimum(start[:, None] + ks, k.size - 1)
            match = pending & (at_u[:, :W] == exact[rows_k])
            kept = np.cumprod(match, 1).sum(1)
        else:
            kept = np.zeros(b, dtype=np.int64)
        resolve = start + kept  # the state whose target takes its exact token now
        r = target[resolve]
        go = r < L
        new_x, new_frozen = x.copy(), fz.copy()
        new_x[idx[go], r[go]] = exact[resolve[go]]
        new_frozen |= pos <= np.where(go, r, L)[:, None]
        new_x[~new_frozen] = sp.mask

        # present: r_a's predictions at the next open positions after r inside r's block (at most `window`)
        V = self.model.vocab_size
        shown = np.broadcast_to(self.presented_bias, (b, L, V)).copy()
        limit = np.minimum((r // self.block + 1) * self.block, cut)
        ahead = ~new_frozen & (pos > r[:, None]) & (pos < limit[:, None]) & go[:, None]
        ahead &= np.cumsum(ahead, 1) <= W
        gate = np.zeros((b, L), dtype=np.float32)
        if gates is None:  # no gate output: every presented draft passes
            gate[ahead] = 1.0
        else:  # the acceptance gate of r_a at each presented position (the chance its draft is kept)
            gate[:, :cut][ahead[:, :cut]] = gates[resolve][ahead[:, :cut]]
        if ahead.any():
            ahead_cut = ahead[:, :cut]
            shown[:, :cut][ahead_cut] += logits[resolve][ahead_cut]
        self.offered = ahead
        proposals = rules.coupled_argmax(shown, self.tempered)
        shown.flags.writeable = False
        return Shown(new_x, new_frozen, proposals, shown, gate, (~new_frozen).astype(np.float32), None, seconds,
                     cut, committed=True)

    def _logits(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """The model's ``logits`` (and acceptance ``gate``, if it has one) for these states: step 0 and no
        self-conditioning, as the block objective trains."""
        model = self.model
        n, cut = tokens.shape
        feed = model.feed(tokens.astype(np.int64), np.zeros(n, dtype=np.int64), self.cond(n, cut))
        names = ["logits", "gate"] if self.gated else ["logits"]
        return {name: out.astype(np.float32) for name, out in zip(names, model.session.run(names, feed))}
