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
mask) runs the states r_0 .. r_m (r_k: the verified tokens and prompt literals, the first k drafts, masks
elsewhere), packed into one sequence per row on a file that takes positions and attention
(:class:`PackedStates`), else as rows of one batch, takes the exact token of u_k from r_k, keeps the leading drafts that equal
theirs, commits the exact token at the first position not kept and freezes everything up to it, and
presents to the selector r_a's predictions at the positions after it in its block (EOS never drafted), with ``gate``
there r_a's acceptance gate when the model has one (training/acceptance_gate.py: the chance the draft is kept), else
1: so the gate selector places the drafts likely to be kept and saves the work of the others. Unpacked, the price
is up to m + 1 rows a molecule per call instead of one, so on a CPU, where a call costs its positions, the calls it
saves cost as much as they save (on the bundled ``refine``, n = 200: 16.2 calls and 44.5 rows a molecule with the
gate selector, against 36 and 36 one token per call); packed, a state adds only its copy of the current block
(n = 64, batch 64: 509 positions a molecule against one token per call's 756, 844 unpacked).
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
    """One call of a block model whose rows need ``windows`` leading positions (rules.row_windows, or a packed
    sequence's length): ``run(rows, cut)`` runs those rows over their first ``cut`` positions. With ``split`` (a CPU,
    where a run costs its rows x window) the rows may go in up to three runs (rules.window_groups), stitched back to
    the widest window, the positions a row did not run zero-filled: they lie in later, all-mask blocks (or past a
    packed sequence's end), which nothing reads and which the row's own window hides from every position it ran."""
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


def verify_states(x: np.ndarray, frozen: np.ndarray, rank: np.ndarray, drafts: np.ndarray,
                  mask_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The states r_0 .. r_m of every row (``drafts`` [B]: its m), one after another: r_k keeps the row's frozen
    tokens and first k open ones (its leading drafts; ``rank`` from :func:`open_positions`) and masks the other open
    positions. Returns (states [S, L], owner [S]: each state's row, k [S], start [B]: each row's first state)."""
    counts = drafts + 1
    owner = np.repeat(np.arange(len(x)), counts)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    k = np.arange(int(counts.sum())) - np.repeat(start, counts)
    keep = frozen[owner] | (~frozen[owner] & (rank[owner] <= k[:, None]))
    return np.where(keep, x[owner], mask_id), owner, k, start


class PackedStates:
    """Where each decoding state of one call lies in the rows the model runs: states that share their committed
    prefix share one row (tree attention, as SpecInfer and Medusa verify candidate drafts).

    A row's states r_0 .. r_m differ only from the row's current block B on (the block of its first open
    position u_0): r_k holds the first k drafts, all inside B. Under the block model's attention
    (``rules.block_attention``) a position before B sees only its own and earlier blocks, and the tokens placed
    after the current block; where none are placed after B (de novo decoding, a template's blank at its end),
    every position before B has the same hidden state in every r_k. So one sequence holds the prefix once and then
    a *copy* of each state from B's start to the end of its window (the block of its target position, which for
    r_m may be the block after B), each copy at its own positions, seeing the prefix and itself only,
    block-causally: the model's outputs in copy k are r_k's, exactly. A row with tokens placed after B (a
    template's text after its blank) keeps one sequence per state.

    ``rows`` [S]: the sequence of each state; ``start`` [S]: where its copy begins in its row's positions (0 for a
    state with its own sequence); ``at`` [S]: where that copy begins in the sequence. ``tokens``, ``positions``,
    ``attend`` and ``lengths``: the sequences, padded with PAD (which every query ignores); ``attend`` None when no
    row shares (the model's own attention then)."""

    def __init__(self, states: np.ndarray, windows: np.ndarray, owner: np.ndarray, first: np.ndarray, block: int,
                 mask_id: int, pad_id: int, pack: bool = True):
        S, L = states.shape
        pos = np.arange(L)[None, :]
        count = np.bincount(owner, minlength=first.size)
        head = np.concatenate([[0], np.cumsum(count)[:-1]])  # each row's first state
        current = np.minimum(first, L - 1) // block * block  # where each row's current block begins
        placed = (states != mask_id) & (states != pad_id)
        after = np.bincount(owner, (placed & (pos >= (current + block)[owner, None])).any(1), minlength=first.size)
        shares = (count > 1) & (after == 0) & pack
        # one sequence per row that packs, then one per state of every other row
        own = ~shares[owner]
        self.rows = np.where(own, shares.sum() + np.cumsum(own) - 1, (np.cumsum(shares) - 1)[owner])
        self.start = np.where(own, 0, current[owner])
        span = windows - self.start
        before = np.cumsum(span) - span  # copies of the same row are consecutive states
        self.at = self.start + np.where(own, 0, before - before[head][owner])
        R = int(self.rows.max(initial=-1)) + 1
        self.lengths = np.zeros(R, dtype=np.int64)
        np.maximum.at(self.lengths, self.rows, self.at + span)
        P = int(self.lengths.max(initial=1))
        # every (state, position) that runs: a copy's positions, and the prefix once, from the row's first state
        where = (pos < windows[:, None]) & ((pos >= self.start[:, None]) | (np.arange(S) == head[owner])[:, None])
        s, p = np.nonzero(where)
        r, o = self.rows[s], self.offset(s, p)
        self.tokens = np.full((R, P), pad_id, dtype=np.int64)
        self.positions = np.zeros((R, P), dtype=np.int64)
        self.tokens[r, o], self.positions[r, o] = states[s, p], p
        self.attend = None  # no row shares: every sequence is one state, with the model's own positions and attention
        if shares.any():
            copy = np.full((R, P), -1, dtype=np.int64)  # which state's copy a position holds (-1: the shared prefix)
            copy[r, o] = np.where(p >= self.start[s], s, -1)
            blk = self.positions // block
            self.attend = (((copy[:, None, :] == -1) | (copy[:, None, :] == copy[:, :, None]))
                           & (blk[:, :, None] >= blk[:, None, :]))
            alone = np.unique(self.rows[own])  # one state's sequences: its own attention, placed text included
            self.attend[alone] = rules.block_attention(self.tokens[alone], block, mask_id, pad_id)

    def offset(self, s: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Where state ``s``'s position ``p`` lies in its sequence (the prefix at its own positions)."""
        return np.where(p < self.start[s], p, self.at[s] + p - self.start[s])


class BlockVerifyStep(ModelStep):
    """The per-batch state of draft-and-verify on a block refine file: each row's noise; the rest lives in
    the loop's tokens and frozen mask (verified positions are frozen, drafts are unfrozen tokens)."""

    #: on a file that takes positions and attention, run a row's states as one sequence (:class:`PackedStates`);
    #: off only to compare
    pack = True

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
        rank, U = open_positions(fz, W + 1)  # along each row's open (unverified) positions
        at_u = np.take_along_axis(x, np.minimum(U, L - 1), 1)
        holds = (U < L) & (at_u != sp.mask) & np.take_along_axis(self.offered, np.minimum(U, L - 1), 1)
        m = np.cumprod(holds[:, :W], 1).sum(1) if W else np.zeros(b, dtype=np.int64)  # the leading drafts

        states, owner, k, start = verify_states(x, fz, rank, m, sp.mask)
        target = U[owner, k]
        windows = rules.row_windows(states, target, sp.mask, sp.pad, self.block)
        cut = int(windows.max(initial=min(L, self.block)))
        packed = PackedStates(states, windows, owner, U[:, 0], self.block, sp.mask, sp.pad,
                              self.pack and self.model.packs)
        started = time.perf_counter()
        out = run_by_window(lambda s, w: self._logits(packed, s, w), packed.lengths, self.model.provider != "cuda")
        seconds = time.perf_counter() - started

        def state_output(name: str, s: np.ndarray, p: np.ndarray) -> np.ndarray:
            """``name``'s values of states ``s`` at positions ``p``."""
            return out[name][packed.rows[s], packed.offset(s, p)]

        # the exact token of each state's target position, from the state where everything before it counts (a
        # state past the row's last open position has none: it reads a position of its own, and nothing uses it)
        at = np.minimum(target, windows - 1)
        exact = rules.coupled_argmax(state_output("logits", np.arange(k.size), at) + self.bias[at],
                                     self.tempered[owner, at])
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
        ra, pa = np.nonzero(ahead)  # every presented position lies inside its state's window
        if "gate" not in out:  # no gate output: every presented draft passes
            gate[ahead] = 1.0
        else:  # the acceptance gate of r_a at each presented position (the chance its draft is kept)
            gate[ra, pa] = state_output("gate", resolve[ra], pa)
        shown[ra, pa] += state_output("logits", resolve[ra], pa)
        self.offered = ahead
        proposals = rules.coupled_argmax(shown, self.tempered)
        shown.flags.writeable = False
        return Shown(new_x, new_frozen, proposals, shown, gate, (~new_frozen).astype(np.float32), None, seconds,
                     int(packed.lengths.max(initial=cut)), committed=True)

    def _logits(self, packed: PackedStates, rows: np.ndarray, cut: int) -> dict[str, np.ndarray]:
        """The model's ``logits`` (and acceptance ``gate``, if it has one) over the first ``cut`` positions of these
        sequences of states: step 0 and no self-conditioning, as the block objective trains."""
        model = self.model
        n = rows.size
        tokens = packed.tokens[rows, :cut]
        given = None if packed.attend is None else (packed.positions[rows, :cut], packed.attend[rows, :cut, :cut])
        feed = model.feed(tokens, np.zeros(n, dtype=np.int64), self.cond(n, cut), packed=given)
        names = ["logits", "gate"] if self.gated else ["logits"]
        return {name: out.astype(np.float32) for name, out in zip(names, model.session.run(names, feed))}
