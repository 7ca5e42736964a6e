"""How many calls a molecule would cost with more draft heads (issue #26, batch 1): extra heads trained on this CPU
on the bundled model's frozen trunk, then draft-and-verify simulated with them.

    python3 experiments/bench/more_drafts.py CHECKPOINT --drafts 5 [--steps 800] [-n 2000] [--out heads.pt]

Why: at batch 1 on a GPU a call costs nearly the same with 3 or 5 drafts, so calls per molecule set the speed
against the one-token decoder (#26 asks 2.5x; the bundled model's 3 drafts take 12.4 calls after the start against
~35.8 tokens). Heads trained here on a frozen trunk, for a few hundred steps, are a lower bound on what heads trained
with the trunk would do. Heads 1..3 are the checkpoint's; each new head starts as a copy of the last one (Medusa
starts a head as the next-token head) and only the new heads train (CE on the token k + 1 places ahead, EOS
included, PAD ignored), on MOSES training molecules. Then `draft_acceptance.simulate` (coupled noise, the
product's rule) runs with all heads and with the first 3, on the same seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from imadarem.training.causal import CausalLM
from imadarem.training.checkpoint import build_model, load_checkpoint
from imadarem.training.data import encode_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draft_acceptance import simulate  # noqa: E402


def widened(model: CausalLM, drafts: int) -> CausalLM:
    """The same trunk and heads with ``drafts`` heads, the new ones copies of the last."""
    wide = CausalLM(dataclasses.replace(model.config, num_drafts=drafts), model.tokenizer)
    state = model.state_dict()
    last = model.config.num_drafts - 1
    for k in range(model.config.num_drafts, drafts):
        for part in ("weight", "bias"):
            state[f"draft.{k}.{part}"] = state[f"draft.{last}.{part}"].clone()
    wide.load_state_dict(state)
    return wide.eval()


def train_heads(model: CausalLM, first_new: int, data: np.ndarray, steps: int, batch: int, lr: float, seed: int):
    sp = model.special
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for k in range(first_new, model.config.num_drafts) for p in model.draft[k].parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    start = time.time()
    for step in range(steps):
        rows = torch.from_numpy(data[rng.integers(0, len(data), batch)])
        inputs = torch.cat([torch.full_like(rows[:, :1], sp.mask), rows[:, :-1]], 1)
        with torch.no_grad():
            hid = model.trunk(inputs)
        loss = 0.0
        for k in range(first_new, model.config.num_drafts):
            ahead = k + 1  # head k (0-based among drafts) guesses the token k + 2 places after its position's input
            logits = model.draft_logits(hid, k)
            target = rows[:, ahead:]
            loss = loss + F.cross_entropy(logits[:, : target.shape[1]].transpose(1, 2), target, ignore_index=sp.pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / steps))
        if step % 100 == 0 or step == steps - 1:
            print(json.dumps({"step": step, "loss": round(float(loss), 4), "seconds": round(time.time() - start)}),
                  flush=True)
    model.eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--drafts", type=int, default=5)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data", default=str(Path.home() / ".cache/imadarem/moses/train.csv.gz"))
    p.add_argument("--molecules", type=int, default=200_000, help="the first N training molecules")
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="save the widened model's state_dict here")
    a = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = build_model(load_checkpoint(a.checkpoint), "ema").eval()
    model = widened(base, a.drafts)
    data = encode_file(a.data, tokenizer=base.tokenizer)
    packed = data.pack(base.config.max_seq_len)[0][: a.molecules]
    train_heads(model, base.config.num_drafts, packed, a.steps, a.batch, a.lr, a.seed)
    if a.out:
        torch.save(model.state_dict(), a.out)
    for name, m in ((f"{base.config.num_drafts} drafts", base), (f"{a.drafts} drafts", model)):
        tokens, calls = simulate(m, a.n, "coupled", a.seed, 250)
        lengths = [len(t) + 1 for t in tokens]
        print(json.dumps({"model": name, "n": a.n, "calls_per_molecule": round(float(np.mean(calls)), 3),
                          "tokens_per_call": round(float(np.sum(lengths) / np.sum(calls)), 3)}), flush=True)


if __name__ == "__main__":
    main()
