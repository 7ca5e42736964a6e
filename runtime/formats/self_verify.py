"""Draft-and-verify in one row, for a block refine file with a verifier (``verify_layers``, issue #24).

Why: a block model without one verifies k drafts by running k + 1 states (formats/block_verify.py), so on a CPU,
where a call costs its rows, the calls it saves cost as many rows as they save. A verifier (training/model.py,
after Campbell et al.'s self-speculative masked diffusions) is a causal layer over the trunk that gives each
position of the current block its left-to-right conditional given the tokens placed before it in the block. The
graph drafts every mask from the trunk's marginals (argmax(logits + bans + T g), the sample's own noise per
position, ``rules.position_noise``), places the drafts, and returns the verifier's logits: one row a call.

One call (:class:`SelfVerifyStep`), per row with open positions u_0, u_1, ... in its current block (at most
``drafts`` + 1 of them): run the state with every open position masked; the exact token of u_k is argmax(verifier
logits at u_k + bans + T g), a sample of the verifier's conditional given the drafts at u_0 .. u_{k-1}, so it is a
left-to-right sample as soon as those drafts equal their own exact tokens (speculative sampling with Gumbel
coupling). Commit u_0's exact token and each next one while the drafts before it held. A sample's molecule is the
same for any batch size. It is not the one-token-per-call molecule (``drafts=0``: u_0 only, each call's trunk
seeing every earlier token committed) token for token: a token committed after held drafts conditions on the
call's trunk state, where the earlier positions of the block were still masks, and reads them through the
verifier alone (the target shifts with the state, as in Campbell et al.). So the two decodings sample slightly
different approximations of the same conditionals, and each is measured on its own. EOS is never drafted (it ends
a row only as an exact token), except in a template's EOS-only slot.
"""

from __future__ import annotations

import time

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.formats.block_verify import ZeroCond, open_positions, run_by_window
from imadarem.runtime.prompt import Layout
from imadarem.runtime.refinement import ModelStep, Shown


class SelfVerifyStep(ModelStep):
    """The per-batch state of one-row draft-and-verify: each row's tempered noise; the rest lives in the loop's
    tokens and frozen mask (verified positions are frozen; every other position is a mask before each call)."""

    def __init__(self, model, n: int, layout: Layout, temperature: float, bias: np.ndarray, keys: np.ndarray,
                 drafts: int, block: int):
        self.model, self.bias, self.window, self.block = model, bias, drafts, block
        self.tempered = rules.tempered_noise(rules.position_noise(keys, layout.length, model.vocab_size),
                                             np.float32(temperature)).astype(np.float32)
        drafted = bias.copy()
        if model.special.eos is not None:  # EOS only ever as an exact token, except in an EOS-only slot
            drafted[~layout.eos_only, model.special.eos] = -np.inf
        self.draft_bias = drafted.astype(np.float32)
        self.cond = ZeroCond(model.hidden_size)

    def keep(self, rows: np.ndarray) -> None:
        if not rows.all():
            self.tempered = self.tempered[rows]

    def run(self, x, fz, t, num_steps, step_temperature, rows) -> Shown:
        sp, W, block = self.model.special, self.window, self.block
        b, L = x.shape
        idx = np.arange(b)[:, None]
        pos = np.arange(L)[None, :]
        state = np.where(fz, x, sp.mask)  # the verified tokens and prompt literals; masks everywhere else
        _, U = open_positions(fz, W + 1)  # U[:, k]: the row's k-th open position u_k (L when it has fewer)
        windows = rules.row_windows(state, U[:, 0], sp.mask, sp.pad, block)
        cut = int(windows.max(initial=min(L, block)))
        started = time.perf_counter()
        out = run_by_window(lambda s, w: self._outputs(state[s, :w], s, w), windows, self.model.provider != "cuda")
        seconds = time.perf_counter() - started

        at = np.minimum(U, cut - 1)
        ours = (U < L) & (U // block == (U[:, :1] // block)) & (U < windows[:, None])  # u_k in u_0's block
        exact = rules.coupled_argmax(out["verify_logits"][idx, at] + self.bias[at], self.tempered[idx, at])
        held = (out["drafts"][idx, at] == exact) & ours
        lead = np.cumprod(held[:, :W], 1).sum(1) if W else np.zeros(b, dtype=np.int64)
        commit = (np.arange(W + 1)[None, :] <= lead[:, None]) & ours  # u_0, and each u_k whose drafts before held
        new_x, new_frozen = x.copy(), fz.copy()
        r, c = np.nonzero(commit)
        new_x[r, U[r, c]] = exact[r, c]
        last = np.where(commit.any(1), U[idx[:, 0], np.maximum(commit.sum(1) - 1, 0)], -1)
        new_frozen |= pos <= last[:, None]
        new_x[~new_frozen] = sp.mask
        # nothing for the selector: every open position is drafted and verified in the graph
        nothing = np.zeros((b, L), dtype=np.float32)
        return Shown(new_x, new_frozen, new_x, None, nothing, None, None, seconds, cut, committed=True)

    def _outputs(self, tokens: np.ndarray, rows: np.ndarray, cut: int) -> dict[str, np.ndarray]:
        """The graph's drafts and verifier logits for these states: step 0 and no self-conditioning, as the block
        objective trains."""
        model = self.model
        n = tokens.shape[0]
        noise = self.draft_bias[None, :cut] + self.tempered[rows, :cut]
        feed = model.feed(tokens.astype(np.int64), np.zeros(n, dtype=np.int64), self.cond(n, cut),
                          draft_noise=np.ascontiguousarray(noise, dtype=np.float32))
        drafts, verify = model.session.run(["drafts", "verify_logits"], feed)
        return {"drafts": drafts, "verify_logits": verify.astype(np.float32)}
