"""Does a block model use the tokens committed inside its current block? Two probes on MOSES test molecules.

    python3 experiments/refine/context_probe.py RUN_DIR_OR_CHECKPOINT [-n 400]

1. Per-token NLL under the left-to-right decoding conditional (clean earlier blocks, the block's own
   earlier positions committed, the rest masked), by offset inside the block, and again with the whole block
   masked: what the in-block context is worth.
2. Swap test: replace the token just before a prediction by another plausible one (sampled from the model at
   that position, the true token excluded) and measure KL(real context || swapped context) of the next
   prediction, inside a block (offset 0 -> offset 1) and across a block boundary (offset 3 -> next offset 0).
   A model that trusts what it committed moves about as much in both.

Single-stream forward, the exported model's own attention (what the runtime decodes with). Prints one JSON row.
"""

from __future__ import annotations

import argparse
import gzip
import json

import numpy as np
import torch
from imadarem.runtime.tokenizer import resolve_special_ids
from imadarem.training.checkpoint import build_model, load_checkpoint
from imadarem.training.data import fetch_moses, smiles_to_selfies_batch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("-n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    model = build_model(load_checkpoint(a.checkpoint), "ema").eval()
    tok, cfg = model.tokenizer, model.config
    sp, L, B = resolve_special_ids(tok), cfg.max_seq_len, cfg.block_size
    with gzip.open(fetch_moses()["test"], "rt") as f:
        smiles = f.read().splitlines()[1:]
    rng = np.random.default_rng(a.seed)
    smiles = [smiles[i] for i in rng.choice(len(smiles), a.n, replace=False)]
    rows = [list(tok.encode(s))[: L - 1] for s in smiles_to_selfies_batch(smiles, workers=1) if s]
    clean = torch.tensor([r + [sp.eos] + [sp.pad] * (L - 1 - len(r)) for r in rows])
    ends = (clean == sp.eos).float().argmax(1)
    pos = torch.arange(L)
    zeros_step = torch.zeros(len(clean), dtype=torch.long)
    zeros_cond = torch.zeros(len(clean), L, cfg.hidden_size)

    def log_probs(x: torch.Tensor, at: int) -> torch.Tensor:
        logits = model(x, zeros_step, zeros_cond)[0][:, at].float()
        logits[:, [sp.mask, sp.pad]] = -1e9
        return torch.log_softmax(logits, -1)

    def masked_from(start: int) -> torch.Tensor:
        return torch.where(pos[None] < start, clean, torch.full_like(clean, sp.mask))

    row: dict = {"checkpoint": a.checkpoint, "molecules": len(clean)}
    with torch.no_grad():
        nll = {"in_block_context": np.zeros(B), "block_masked": np.zeros(B)}
        count = np.zeros(B)
        for t in range(min(L, 40)):
            use = (t <= ends).float()
            count[t % B] += float(use.sum())
            for key, start in (("in_block_context", t), ("block_masked", t - t % B)):
                lp = log_probs(masked_from(start), t).gather(1, clean[:, t:t + 1]).squeeze(1)
                nll[key][t % B] -= float((lp * use).sum())
        for key, total in nll.items():
            row[f"nll_{key}_by_offset"] = [round(v, 4) for v in (total / count).tolist()]
            row[f"nll_{key}"] = round(float(total.sum() / count.sum()), 4)

        kls: dict[str, list[float]] = {"in_block": [], "cross_block": []}
        for b in range(1, 7):
            for kind, (c, t) in {"in_block": (B * b, B * b + 1), "cross_block": (B * b - 1, B * b)}.items():
                alt_lp = log_probs(masked_from(c), c)
                alt_lp[torch.arange(len(clean)), clean[:, c]] = -1e9
                swapped = masked_from(t)
                swapped[:, c] = torch.distributions.Categorical(logits=alt_lp).sample()
                lp, lp2 = log_probs(masked_from(t), t), log_probs(swapped, t)
                kl = (lp.exp() * (lp - lp2)).sum(-1)
                kls[kind] += kl[t < ends].tolist()
        for kind, values in kls.items():
            row[f"swap_kl_{kind}"] = round(float(np.mean(values)), 4)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
