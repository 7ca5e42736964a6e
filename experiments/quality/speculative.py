"""Draft-and-verify decoding of a left-to-right model with draft heads (standalone research script).

The model is the harness's causal transformer plus D-1 small draft heads (Medusa / multi-token
prediction): at position j the main head gives p(x_{j+1} | x_<=j), draft head k gives q_k(x_{j+1+k} |
x_<=j), the marginal k tokens further ahead. One decoding call feeds the next exact token and the D-1
drafts; the main head at each draft's previous position gives the draft's exact conditional, and each
draft is kept with probability min(1, p/q) (speculative sampling, Leviathan et al. 2023), the first
rejected one replaced by a sample of max(0, p - q). The output distribution is the left-to-right
model's exactly; what the drafts buy is fewer sequential calls: 1 + (accepted drafts) tokens per call.

Also here, for the same model: plain left-to-right sampling (one token per call) and the unverified
parallel rule (commit drafts while their q-probability exceeds tau), to show what verification is for.

    python3 speculative.py --name mtp4 --drafts 3 --train-seconds 420 --data DATA/train_selfies.npz \
        --samples samples.jsonl --decoders "ar;spec;spec,drafts=2;tau=0.9" --save mtp4.pt
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from block_diffusion import EOS, MASK, PAD, Net, add_common_args, decode_smiles, set_lr, update  # noqa: E402

BOS = MASK  # the harness's AR models start from MASK


class DraftNet(Net):
    """The causal transformer plus ``drafts`` residual draft heads sharing the tied output embedding."""

    def __init__(self, vocab, L, h=256, layers=6, heads=8, drafts=3):
        super().__init__(vocab, L, h, layers, heads)
        self.draft = nn.ModuleList(nn.Linear(h, h) for _ in range(drafts))
        for lin in self.draft:  # start as copies of the main head (Medusa's init)
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, tokens, pos, mask):
        hid = self.trunk(tokens, pos, mask)
        main = hid @ self.tok.weight.t()
        drafts = [(hid + F.gelu(lin(hid))) @ self.tok.weight.t() for lin in self.draft]
        return main, drafts


def valid_upto_eos(x0):
    """[B, L] bool: positions up to and including each row's first EOS."""
    before = torch.cumsum((x0 == EOS).long(), 1) - (x0 == EOS).long() == 0
    return before


def train(args, data, vocab, device):
    L = data.shape[1]
    model = DraftNet(vocab, L, args.hidden, args.layers, args.heads, args.drafts).to(device)
    if args.init:  # continue from saved weights (the optimiser starts afresh, with its warmup)
        model.load_state_dict({k: v.float() for k, v in torch.load(args.init, map_location=device).items()})
    nparam = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    data_t = torch.from_numpy(data.astype(np.int64))
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    pos = torch.arange(L, device=device)[None]
    started, step, log, est_total = time.time(), 0, [], None
    while time.time() - started < args.train_seconds:
        est_total = set_lr(opt, args, step, time.time() - started, est_total)
        x0 = data_t[torch.randint(0, len(data_t), (args.batch,), generator=g)].to(device, non_blocking=True)
        valid = valid_upto_eos(x0)
        with torch.autocast("cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16):
            inp = torch.cat([torch.full_like(x0[:, :1], BOS), x0[:, :-1]], 1)
            main, drafts = model(inp, pos, causal)
            ce = F.cross_entropy(main.float().reshape(-1, vocab), x0.reshape(-1), reduction="none").view_as(x0)
            loss = (ce * valid).sum() / valid.sum()
            for k, lg in enumerate(drafts, start=1):  # head k at position j predicts x0[j + k]
                tgt, ok = x0[:, k:], valid[:, k:]
                dce = F.cross_entropy(lg[:, :-k].float().reshape(-1, vocab), tgt.reshape(-1), reduction="none")
                loss = loss + args.draft_weight * (dce.view_as(tgt) * ok).sum() / ok.sum()
        update(model, opt, loss, step, started, log, args.name)
        step += 1
    return model, {"params": nparam, "params_without_drafts": nparam - sum(p.numel() for p in model.draft.parameters()),
                   "train_steps": step, "train_seconds": round(time.time() - started, 1), "log": log}


def _probs(logits, temp):
    logits = logits.float()
    logits[..., [PAD, MASK]] = -float("inf")
    return torch.softmax(logits / temp, -1)


@torch.no_grad()
def decode(model, n, L, temp, device, drafts, rule="spec", tau=0.9):
    """Returns ids [n, L] and sequential calls per row. ``rule``: 'spec' (verified drafts), 'tau'
    (drafts committed while q > tau, unverified), 'ar' (no drafts)."""
    D = 0 if rule == "ar" else drafts
    s = torch.full((n, L + 1), PAD, dtype=torch.long, device=device)
    s[:, 0] = BOS
    causal = torch.ones(L + 1, L + 1, dtype=torch.bool, device=device).tril()
    pos = torch.arange(L + 1, device=device)[None]
    c = torch.zeros(n, dtype=torch.long, device=device)  # committed tokens (s[1..c])
    done = torch.zeros(n, dtype=torch.bool, device=device)
    calls = torch.ones(n, device=device)  # the call at BOS
    amp = torch.autocast("cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)

    def heads_at(out_main, out_drafts, at):
        """Exact next-token probs and the draft distributions at positions ``at`` ([n])."""
        idx = at[:, None, None].expand(-1, 1, out_main.shape[-1])
        p = _probs(out_main.gather(1, idx)[:, 0], temp)
        qs = [_probs(d.gather(1, idx)[:, 0], temp) for d in out_drafts[:D]]
        return p, qs

    with amp:
        main, dr = model(s[:, :1], pos[:, :1], causal[:1, :1])
    p, qs = heads_at(main, dr, torch.zeros(n, dtype=torch.long, device=device))
    pend = torch.multinomial(p, 1)[:, 0]
    q = torch.stack(qs, 1) if D else None  # [n, D, V]
    d = torch.multinomial(q.reshape(-1, q.shape[-1]), 1).view(n, D) if D else None
    while not done.all():
        act = (~done).nonzero()[:, 0]
        ca = c[act]
        # write the exact token and the drafts (those that fit in L)
        s[act, ca + 1] = pend[act]
        room = (L - 1 - ca).clamp(min=0)  # drafts that fit after the exact token
        nd = torch.clamp(room, max=D) if D else torch.zeros_like(ca)
        for m in range(D):
            fits = m < nd
            s[act[fits], ca[fits] + 2 + m] = d[act[fits], m]
        with amp:
            main, dr = model(s[act], pos, causal)
        calls[act] += 1
        nact = len(act)
        # verify drafts left to right: draft m (0-based) sits at position ca + 2 + m; its exact conditional
        # is the main head at position ca + 1 + m
        accepted = torch.zeros(nact, dtype=torch.long, device=device)
        alive = torch.ones(nact, dtype=torch.bool, device=device)
        resid = torch.zeros(nact, dtype=torch.long, device=device)
        rejected = torch.zeros(nact, dtype=torch.bool, device=device)
        alive &= pend[act] != EOS
        for m in range(D):
            at = ca + 1 + m
            pm = _probs(main[torch.arange(nact, device=device), at.clamp(max=L)], temp)
            qm = q[act, m]
            dm = d[act, m]
            ok = alive & (m < nd)
            if rule == "spec":
                ratio = pm.gather(1, dm[:, None])[:, 0] / qm.gather(1, dm[:, None])[:, 0].clamp(min=1e-20)
                acc = torch.rand(nact, device=device) < ratio
            else:  # tau: commit while the draft was confident, no verification
                acc = qm.gather(1, dm[:, None])[:, 0] > tau
            newly_rejected = ok & ~acc
            if rule == "spec" and newly_rejected.any():
                r = (pm - qm).clamp(min=0)
                r = torch.where(r.sum(1, keepdim=True) > 0, r, pm)
                resid = torch.where(newly_rejected, torch.multinomial(r, 1)[:, 0], resid)
            rejected |= newly_rejected
            accepted += (ok & acc).long()
            alive = ok & acc & (dm != EOS)
        # commit the exact token and the accepted drafts; EOS among them ends the row
        newc = ca + 1 + accepted
        committed_eos = (pend[act] == EOS) | ((s[act] == EOS) & (pos[0] >= (ca + 2)[:, None]) &
                                              (pos[0] <= newc[:, None])).any(1)
        # clear rejected drafts beyond the new frontier
        beyond = pos[0][None] > newc[:, None]
        s[act] = torch.where(beyond, torch.full_like(s[act], PAD), s[act])
        c[act] = newc
        finished = committed_eos | (newc >= L)
        done[act[finished]] = True
        # the next exact token: the residual sample after a rejection, else the main head at newc
        p_next, qs_next = heads_at(main, dr, newc.clamp(max=L))
        if rule == "spec":
            fresh = torch.multinomial(p_next, 1)[:, 0]
            pend[act] = torch.where(rejected, resid, fresh)
        else:
            pend[act] = torch.multinomial(p_next, 1)[:, 0]
        if D:
            qn = torch.stack(qs_next, 1)
            q[act] = qn
            d[act] = torch.multinomial(qn.reshape(-1, qn.shape[-1]), 1).view(nact, D)
    return s[:, 1:], calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--drafts", type=int, default=3)
    ap.add_argument("--draft-weight", type=float, default=0.5)
    add_common_args(ap)
    ap.add_argument("--decoders", default="ar;spec")
    ap.add_argument("--data", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--save", default="")
    ap.add_argument("--load", default="")
    ap.add_argument("--init", default="", help="start training from these weights")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    itos = json.load(open(args.data + ".vocab.json"))
    L = args.L
    if args.load:
        model = DraftNet(len(itos), L, args.hidden, args.layers, args.heads, args.drafts).to(device)
        model.load_state_dict({k: v.float() for k, v in torch.load(args.load, map_location=device).items()})
        info = {"params": sum(p.numel() for p in model.parameters()), "loaded": args.load, "log": []}
    else:
        model, info = train(args, np.load(args.data)["ids"][:, :L], len(itos), device)
    model.eval()
    if args.save:
        torch.save({k: v.half() for k, v in model.state_dict().items()}, args.save)
    for dec in args.decoders.split(";"):
        kv = dict(p.split("=") if "=" in p else (p, "1") for p in dec.split(","))
        rule = "tau" if "tau" in kv else "ar" if "ar" in kv else "spec"
        torch.manual_seed(args.seed + 1)
        t0 = time.time()
        ids, calls = decode(model, args.n, L, float(kv.get("T", 1.0)), device, int(kv.get("drafts", args.drafts)),
                            rule, float(kv.get("tau", 0.9)))
        smi = decode_smiles(ids.cpu(), itos)
        with open(args.samples, "a") as fh:
            fh.write(json.dumps({"name": args.name, "decoder": dec, "calls_mean": round(float(calls.mean()), 2),
                                 "sample_s": round(time.time() - t0, 1), "info": info, "smiles": smi}) + "\n")
        print(args.name, dec, "calls", round(float(calls.mean()), 2), flush=True)


if __name__ == "__main__":
    main()
