"""How close a block file's verifier comes to the left-to-right conditionals it stands in for (issue #24, ninth step).

For molecules of a SMILES file (MOSES test sample by default), per position k = 0..3 of each block, three teacher-
forced negative log-likelihoods (nats a token):

- ``marginal``: the trunk's logits on the state a call runs (everything before the block committed, the block masked);
- ``verifier``: ``verify_logits`` on that state with the block's true tokens placed (what one-row draft-and-verify
  samples from when the drafts before the position held);
- ``l2r``: the trunk's logits on the state with everything before the position committed (one token per call).

A verifier that matches ``l2r`` samples as well as one token per call; the gap is what its samples lose.

    python3 experiments/refine/verifier_nll.py MODEL.onnx [--smiles FILE] [-n 200]
"""

from __future__ import annotations

import argparse
import csv

import numpy as np
from imadarem.runtime import Generator


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--smiles", default="tests/fixtures/moses_test_sample.csv")
    p.add_argument("-n", type=int, default=200)
    a = p.parse_args()
    m = Generator(a.model).model
    sp, L, V, H = m.special, m.typed.max_seq_len, m.vocab_size, m.hidden_size
    with open(a.smiles) as f:
        smiles = [row[0] for row in csv.reader(f)][1:a.n + 1]
    seqs = [ids for ids in (m.tokenizer.encode(s) for s in smiles) if len(ids) < L]
    nll = {name: {k: [] for k in range(4)} for name in ("marginal", "verifier", "l2r")}
    for seq in seqs:
        full = list(seq) + [sp.eos]
        n = len(full)
        placed = np.full((1, L, V), -1e4, np.float32)  # draft_noise that makes every draft the true token
        placed[0, np.arange(n), full] = 1e4
        states = np.full((n, L), sp.mask, np.int64)  # row j: the positions before j committed
        for j in range(n):
            states[j, :j] = full[:j]
        l2r = m.session.run(["logits"], m.feed(states, np.zeros(n, np.int64), np.zeros((n, L, H), np.float32),
                                               draft_noise=np.repeat(placed, n, 0)))[0]
        for b in range(0, n, 4):
            feed = m.feed(states[b:b + 1], np.zeros(1, np.int64), np.zeros((1, L, H), np.float32), draft_noise=placed)
            marginal, verifier = m.session.run(["logits", "verify_logits"], feed)
            for k in range(min(4, n - b)):
                j = b + k
                nll["marginal"][k].append(-log_softmax(marginal[0, j])[full[j]])
                nll["verifier"][k].append(-log_softmax(verifier[0, j])[full[j]])
                nll["l2r"][k].append(-log_softmax(l2r[j, j])[full[j]])
    for k in range(4):
        print(f"k={k} positions={len(nll['l2r'][k])} " + " ".join(
            f"{name}={np.mean(v[k]):.3f}" for name, v in nll.items()))


if __name__ == "__main__":
    main()
