"""Prototype: exact left-to-right sampling from a block refine model in fewer calls (self-speculative decoding).

A block model's prediction at the first mask of a row whose prefix is committed is its left-to-right
conditional; its predictions at the other masks of that block are marginals that can serve as drafts. Each
call runs, per molecule, the states r_0 .. r_m (the committed prefix, the first k of the m pending drafts,
masks after) as rows of one batch: r_k's prediction at its first mask is the exact conditional p_k that the
k-th draft is checked against (speculative sampling: keep it with probability min(1, p_k / q_k), else draw
from the residual max(0, p_k - q_k) and stop); when every draft is kept, r_m gives one more token. New drafts
are r_a's marginals at the rest of that state's current block (a = drafts kept). So the molecules are
exactly left-to-right samples (the l2r selector's distribution) and a call commits 1 + a tokens; the price
is up to 4 rows per molecule per call instead of 1.

    python3 experiments/refine/speculative_block.py MODEL.onnx -n 1000 --generate-only DIR
    python3 experiments/refine/sweep.py MODEL.onnx --score DIR          # MOSES's metrics, a row in results.jsonl

Rows: mean model calls per molecule and the rows (states) run per molecule, the compute a call's batch holds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from imadarem.runtime.bans import banned_ids
from imadarem.runtime.formats import open_model


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def draw(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws from rows of ``p`` [n, V] with uniforms ``u`` [n]."""
    c = np.cumsum(p, -1)
    return np.minimum((c < (u[:, None] * c[:, -1:])).sum(-1), p.shape[-1] - 1)


def generate(path: str, n: int, seed: int, batch: int, max_drafts: int = 3, threads: int | None = None):
    model = open_model(path, threads=threads)
    sp, cfg = model.special, model.typed
    L, B, V, H = cfg.max_seq_len, int(model.config["block_size"]), cfg.vocab_size, cfg.hidden_size
    bias = np.zeros(V, np.float32)
    bias[banned_ids(sp, getattr(model.tokenizer, "unk_token_id", None))] = -np.inf
    rng = np.random.default_rng(seed)
    texts, calls, rows_run = [], [], []
    for start in range(0, n, batch):
        N = min(batch, n - start)
        tok = np.full((N, L), sp.mask, np.int64)
        c = np.zeros(N, np.int64)  # committed prefix length
        m = np.zeros(N, np.int64)  # pending drafts at c .. c+m-1
        dtok = np.zeros((N, max_drafts), np.int64)
        dq = np.zeros((N, max_drafts, V), np.float32)
        done = np.zeros(N, bool)
        ncalls = np.zeros(N, np.int64)
        nrows = np.zeros(N, np.int64)
        while not done.all():
            live = np.flatnonzero(~done)
            # the states r_0 .. r_m of every live molecule, one batch
            owner = np.repeat(live, m[live] + 1)
            k = np.concatenate([np.arange(m[i] + 1) for i in live])
            X = tok[owner].copy()
            for j in range(max_drafts):  # r_k holds drafts 0 .. k-1
                put = k > j
                X[put, c[owner[put]] + j] = dtok[owner[put], j]
            cut = int(min(L, (c[owner] + k).max() + B + 1))
            out = model.session.run(None, model.feed(np.ascontiguousarray(X[:, :cut]), np.zeros(len(X), np.int64),
                                                     np.zeros((len(X), cut, H), np.float32)))
            logits = out[0] + bias
            ncalls[live] += 1
            nrows[live] += m[live] + 1
            probs = softmax(logits.astype(np.float64))  # [rows, cut, V]
            row_of = {(int(i), int(kk)): r for r, (i, kk) in enumerate(zip(owner, k))}
            for i in live:
                ci, mi = int(c[i]), int(m[i])
                a, new = 0, None
                while a < mi:
                    p = probs[row_of[(i, a)], ci + a]
                    q = dq[i, a]
                    d = dtok[i, a]
                    if rng.random() < min(1.0, p[d] / max(q[d], 1e-30)):
                        a += 1
                        continue
                    res = np.maximum(p - q, 0.0)
                    new = int(draw(res[None] / res.sum(), rng.random(1))[0]) if res.sum() > 0 else int(
                        draw(p[None], rng.random(1))[0])
                    break
                r_a = row_of[(i, a)]
                if new is None:  # every draft kept: one more exact token from r_a
                    new = int(draw(probs[r_a, ci + a][None], rng.random(1))[0])
                committed = list(dtok[i, :a]) + [new]
                for j, t in enumerate(committed):
                    tok[i, ci + j] = t
                c[i] = ci + len(committed)
                if sp.eos in committed or c[i] >= L:
                    e = ci + committed.index(sp.eos) if sp.eos in committed else L - 1
                    tok[i, e + 1:] = sp.pad
                    done[i] = True
                    continue
                # new drafts: r_a's marginals after its first mask, inside that state's current block
                block_end = ((ci + a) // B + 1) * B
                todo = min(max_drafts, max(0, block_end - int(c[i])), L - int(c[i]))
                if todo > 0 and c[i] < cut:
                    q = probs[r_a, c[i]:c[i] + todo].astype(np.float32)
                    q[:, sp.eos] = 0.0  # an EOS is only ever an exact token
                    q /= q.sum(-1, keepdims=True)
                    todo = q.shape[0]
                    dq[i, :todo] = q
                    dtok[i, :todo] = draw(q, rng.random(todo))
                m[i] = todo
        for i in range(N):
            ids = [int(t) for t in tok[i] if t not in (sp.pad, sp.mask)]
            if sp.eos in ids:
                ids = ids[: ids.index(sp.eos)]
            texts.append(model.tokenizer.decode(ids))
        calls += list(ncalls)
        rows_run += list(nrows)
    return texts, float(np.mean(calls)), float(np.mean(rows_run))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--drafts", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--tag", default="")
    p.add_argument("--generate-only", metavar="DIR", required=True,
                   help="write the molecules and the row to DIR/try-00.json; score them with "
                        "experiments/refine/sweep.py MODEL --score DIR (rows go to results.jsonl)")
    a = p.parse_args()
    t0 = time.perf_counter()
    texts, calls, rows = generate(a.model, a.n, a.seed, a.batch, a.drafts, a.threads)
    row = {"model": a.model, "tag": a.tag, "selector": "speculative-block (experiments/refine/speculative_block.py)",
           "options": {"drafts": a.drafts}, "steps": None, "n": a.n, "seed": a.seed, "calls": calls,
           "rows_per_molecule": rows, "generate_seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(row), flush=True)
    Path(a.generate_only).mkdir(parents=True, exist_ok=True)
    Path(a.generate_only, "try-00.json").write_text(json.dumps({**row, "texts": texts}))


if __name__ == "__main__":
    main()
