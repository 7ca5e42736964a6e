"""How many calls a molecule costs under two exact acceptance rules for the same drafts (issue #26, batch 1).

    python3 experiments/bench/draft_acceptance.py CHECKPOINT [-n 1000] [--batch 250] [--seed 0]

Why: at batch 1 on a GPU a call's time is nearly fixed, so calls per molecule set the speed against the one-token
decoder (#26 asks 2.5x; 1.95x measured on an H100). The product keeps a draft iff it equals the exact token drawn
with the same Gumbel noise (``rules.coupled_sample``): the molecule is then the left-to-right decoder's, token for
token, for the same seed. Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) keeps a draft drawn from
the draft head's q with probability min(1, p/q) and otherwise draws the token from norm(max(p - q, 0)): also an
exact sample of the left-to-right distribution, not the same molecule for the same seed, and it keeps a draft as
often as any coupling can (sum of min(p, q)), where the Gumbel coupling keeps it less often. This simulates both
decoders on a causal checkpoint in PyTorch (no cache: each call runs the whole prefix, which changes no
probability) and prints, per rule, the calls a molecule costs after the start (a decode file's first tokens come
from its metadata, without a call) and the molecules (SMILES, for a quality check with `imadarem eval molecules
--samples`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from imadarem.training.checkpoint import build_model, load_checkpoint


def gumbel(gen: torch.Generator, shape) -> torch.Tensor:
    u = torch.rand(shape, generator=gen).clamp_(1e-20, 1 - 1e-7)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def simulate(model, n: int, rule: str, seed: int, batch: int) -> tuple[list[list[int]], list[int]]:
    sp, V, L = model.special, model.config.vocab_size, model.config.max_seq_len
    D = model.config.num_drafts
    ban = torch.zeros(V)
    ban[[sp.mask, sp.pad]] = -float("inf")
    out_tokens, out_calls = [], []
    for first in range(0, n, batch):
        b = min(batch, n - first)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + first)
        # per (row, position): the coupled rule's shared noise, the same for any number of drafts (<= 16)
        noise = gumbel(gen, (b, L + 18, V))
        logits, drafts = model.teacher_forcing(torch.full((b, 1), sp.mask))
        seqs, guesses, calls, done = [[] for _ in range(b)], [[] for _ in range(b)], [0] * b, [False] * b
        for r in range(b):
            seqs[r].append(_exact(logits[r, 0] + ban, noise[r, 0], rule, gen))
            guesses[r] = [_draft(drafts[r, 0, k] + ban, noise[r, 1 + k], rule, gen) for k in range(D)]
            done[r] = seqs[r][-1] == sp.eos
        while not all(done):
            live = [r for r in range(b) if not done[r]]
            rows = [[sp.mask] + seqs[r] + [g for g, _ in guesses[r]] for r in live]
            width = max(map(len, rows))
            inputs = torch.tensor([row + [sp.pad] * (width - len(row)) for row in rows])
            logits, drafts = model.teacher_forcing(inputs)
            for i, r in enumerate(live):
                calls[r] += 1
                at = len(seqs[r])  # logits here: the token after the newest exact one (the first draft's)
                kept_at = at
                for k, (guess, q) in enumerate(guesses[r]):
                    p_logits = logits[i, at + k] + ban
                    pos = len(seqs[r])
                    if rule == "coupled":
                        exact = int(torch.argmax(p_logits + noise[r, pos]))
                        ok = exact == guess
                    else:
                        p, qp = torch.softmax(p_logits, -1), torch.softmax(q, -1)
                        ok = bool(torch.rand((), generator=gen) < torch.clamp(p[guess] / qp[guess], max=1.0))
                        if not ok:
                            resid = torch.clamp(p - qp, min=0)
                            exact = int(torch.multinomial(resid / resid.sum(), 1, generator=gen))
                    kept_at = at + k + 1
                    if ok:
                        seqs[r].append(guess)
                        if guess == sp.eos or len(seqs[r]) >= L:
                            break
                        continue
                    seqs[r].append(exact)
                    kept_at = at + k  # the position whose logits drew this exact token
                    break
                else:  # every draft kept: the bonus token from the last position
                    seqs[r].append(_exact(logits[i, at + D] + ban, noise[r, len(seqs[r])], rule, gen))
                    kept_at = at + D
                if seqs[r][-1] == sp.eos or len(seqs[r]) >= L:
                    done[r] = True
                    continue
                base = len(seqs[r])  # drafts guess the positions after the newest exact token
                guesses[r] = [_draft(drafts[i, kept_at, k] + ban, noise[r, base + k], rule, gen) for k in range(D)]
        out_tokens += [s[:-1] if s and s[-1] == sp.eos else s for s in seqs]
        out_calls += calls
    return out_tokens, out_calls


def _exact(logits, noise, rule, gen) -> int:
    if rule == "coupled":
        return int(torch.argmax(logits + noise))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


def _draft(logits, noise, rule, gen) -> tuple[int, torch.Tensor]:
    """A draft and the logits it was drawn from (speculative sampling needs q)."""
    return _exact(logits, noise, rule, gen), logits


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", default="coupled,speculative")
    p.add_argument("--out", help="folder for RULE.smi files")
    a = p.parse_args()
    torch.set_num_threads(2)
    model = build_model(load_checkpoint(a.checkpoint), "ema").eval()
    for rule in a.rules.split(","):
        tokens, calls = simulate(model, a.n, rule, a.seed, a.batch)
        lengths = [len(t) + 1 for t in tokens]  # with EOS
        row = {"rule": rule, "n": a.n, "calls_per_molecule": round(float(np.mean(calls)), 3),
               "tokens_per_molecule": round(float(np.mean(lengths)), 3),
               "tokens_per_call": round(float(np.sum(lengths) / np.sum(calls)), 3)}
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            texts = [model.tokenizer.decode(t) for t in tokens]
            (Path(a.out) / f"{rule}.smi").write_text("\n".join(texts) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
