"""Prototype: draft-and-verify plus *trusted* parallel commits on a block refine model (issue #24, points 2 and 6).

Why: on a CPU a call costs its rows, and draft-and-verify can never run fewer rows than one exact token per call
(rows = tokens + rejected drafts), while confidence 0.9 (one row a call, parallel commits) runs 26.5 calls. This
mixes the two: after a verify call commits its exact token at u_a, the next positions of the block whose proposal
(drawn from the resolving state r_a with the position's own noise, EOS allowed) has probability >= ``trust`` are
committed at once, unverified, as confidence 0.9 commits them; the selector drafts what follows, verified by the
next call. ``trust`` 1.0 (never) is the product's draft-and-verify, token for token.

    python3 experiments/refine/trusted_commits.py runtime/models/refine.onnx -n 2000 --trust 0.9 --drafts 3

writes a row (calls, rows a molecule, MOSES's metrics) to experiments/refine/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import imadarem.runtime.formats.refine as refine_format
import numpy as np
from imadarem.runtime.formats import block_verify
from imadarem.runtime.formats.block_verify import BlockVerifyStep
from imadarem.runtime.generator import Generator

RESULTS = Path(__file__).with_name("results.jsonl")


_stitched: dict = {}
_run_by_window = block_verify.run_by_window


def _keeping_logits(*args, **kwargs):
    """block_verify.run_by_window, keeping the call's logits for the trusted commits."""
    _stitched.update(_run_by_window(*args, **kwargs))
    return _stitched


class TrustedVerifyStep(BlockVerifyStep):
    trust = 1.0
    rows_run = 0
    after_reject = True  # --no-trust-after-reject: no trusted commits in a call that rejected a draft
    fresh: np.random.Generator | None = None  # --fresh: trusted proposals drawn with new noise each call

    def _logits(self, tokens):
        TrustedVerifyStep.rows_run += len(tokens)
        return super()._logits(tokens)

    def run(self, x, fz, t, num_steps, step_temperature, rows):
        sp, W, L = self.model.special, self.window, x.shape[1]
        # the rows' states as the parent lays them out: row i's states start at start[i], r_k at start[i] + k
        open_ = ~fz
        rank = np.cumsum(open_, 1) * open_
        U = np.stack([np.where((rank == k + 1).any(1), (rank == k + 1).argmax(1), L) for k in range(W + 1)], 1)
        at_u = np.take_along_axis(x, np.minimum(U, L - 1), 1)
        holds = (U < L) & (at_u != sp.mask) & np.take_along_axis(self.offered, np.minimum(U, L - 1), 1)
        m = np.cumprod(holds[:, :W], 1).sum(1) if W else np.zeros(len(x), dtype=np.int64)
        start = np.concatenate([[0], np.cumsum(m + 1)[:-1]])
        shown = super().run(x, fz, t, num_steps, step_temperature, rows)
        ahead = self.offered
        if self.trust >= 1.0 or not ahead.any():
            return shown
        newly = shown.frozen & ~fz
        r = np.where(newly.any(1), L - 1 - np.argmax(newly[:, ::-1], 1), -1)
        a = np.argmax(U == r[:, None], 1)  # the state that resolved r
        logits, cut = _stitched["logits"][start + a], _stitched["logits"].shape[1]
        z = (logits + self.bias[:cut]) / max(self.temperature, 1e-6)  # EOS allowed
        z -= z.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
        candidates = shown.proposals
        if self.fresh is not None:
            # a new Gumbel draw per call: a position whose draw missed the bar is drawn again next call (the
            # loop's confidence selector does the same), so its commits favour likely tokens
            gumbel = -np.log(-np.log(self.fresh.uniform(1e-12, 1.0, size=z.shape)))
            candidates = shown.proposals.copy()
            candidates[:, :cut] = np.argmax(z + gumbel, -1)
        prob = np.zeros(ahead.shape, dtype=np.float32)
        prob[:, :cut] = np.take_along_axis(p, candidates[:, :cut, None], -1)[..., 0]
        ended = (shown.x == sp.eos).any(1) if sp.eos is not None else np.zeros(len(x), bool)
        sure = ahead & (prob >= self.trust) & ~ended[:, None]
        if not self.after_reject:  # u_a's exact token surprised its draft: what follows it was drawn without it
            sure &= (a >= m)[:, None]
        lead = np.cumprod(np.where(ahead, sure, True), 1).astype(bool) & ahead  # the leading run of sure ones
        if lead.any():
            shown.x[lead] = candidates[lead]
            shown.frozen[lead] = True
            shown.gate[lead] = 0.0
            self.offered = ahead & ~lead
        return shown


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust", type=float, default=0.9)
    p.add_argument("--drafts", type=int, default=3)
    p.add_argument("--selector", default="gate")
    p.add_argument("--option", action="append", default=[], metavar="K=V")
    p.add_argument("--fresh", action="store_true", help="draw trusted proposals with fresh noise each call")
    p.add_argument("--no-trust-after-reject", action="store_true",
                   help="commit trusted tokens only in calls whose drafts were all kept")
    p.add_argument("--tag", default="")
    p.add_argument("--no-score", action="store_true")
    a = p.parse_args()
    refine_format.BlockVerifyStep = TrustedVerifyStep
    block_verify.run_by_window = _keeping_logits
    TrustedVerifyStep.trust = a.trust
    TrustedVerifyStep.after_reject = not a.no_trust_after_reject
    if a.fresh:
        TrustedVerifyStep.fresh = np.random.default_rng(a.seed + 1000)
    options = {k: float(v) for k, v in (o.split("=", 1) for o in a.option)}
    gen = Generator(a.model)
    t0 = time.perf_counter()
    samples = gen.generate(a.n, seed=a.seed, drafts=a.drafts, selector=a.selector, batch_size=500, **options)
    seconds = time.perf_counter() - t0
    row = {"model": a.model, "tag": a.tag, "selector": f"trusted-commits (experiments/refine/trusted_commits.py) "
           f"{a.selector}", "options": {"trust": a.trust, "drafts": a.drafts, "fresh": a.fresh,
           "trust_after_reject": not a.no_trust_after_reject, **options}, "n": a.n, "seed": a.seed,
           "calls": float(np.mean([s.steps for s in samples])), "rows": TrustedVerifyStep.rows_run / a.n,
           "generate_seconds": round(seconds, 1)}
    if not a.no_score:
        from imadarem.training.evaluation.molecules import score_smiles

        row.update(score_smiles([s.text for s in samples]))
    print(json.dumps(row))
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
