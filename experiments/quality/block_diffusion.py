"""Quality experiments for the default-model issue (standalone research script; run on a GPU).

One process = one model: `ar` (causal, left-to-right) or `bd` (block diffusion: blocks left to right,
masked diffusion inside a block, clean prefix as context; BD3-LM's vectorised training with x_t ++ x_0).
Trains for --train-seconds, then samples n molecules with each decoder setting and evaluates with
MOSES's own FCD reference statistics. Writes one JSON row per (model, decoder) to --out.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PAD, MASK, EOS = 0, 1, 2


class Block(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))

    def forward(self, x, mask):
        b, n, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, -1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, h))
        return x + self.mlp(self.ln2(x))


class Net(nn.Module):
    def __init__(self, vocab, L, h=256, layers=6, heads=8, gate=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, h)
        self.pos = nn.Embedding(L + 1, h)
        self.blocks = nn.ModuleList(Block(h, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(h)
        self.gate = nn.Linear(h, 1) if gate else None
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def trunk(self, tokens, pos, mask):
        x = self.tok(tokens) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.ln(x)

    def forward(self, tokens, pos, mask):
        hid = self.trunk(tokens, pos, mask)
        logits = hid @ self.tok.weight.t()
        g = self.gate(hid).squeeze(-1) if self.gate is not None else None
        return logits, g


def bd_train_mask(L, B, device):
    """[2L, 2L] bool: noisy block b sees noisy block b + clean blocks < b; clean block b sees clean <= b."""
    blk = torch.arange(L, device=device) // B
    qn, kn = blk[:, None], blk[None, :]
    nn_ = qn == kn
    nc = kn < qn
    cc = kn <= qn
    top = torch.cat([nn_, nc], 1)
    bot = torch.cat([torch.zeros_like(nn_), cc], 1)
    return torch.cat([top, bot], 0)


def set_lr(opt, args, step, elapsed, est_total):
    """Warmup 300 steps, then cosine to 0.1x over the steps the time budget allows (estimated after 50)."""
    if step == 50:
        est_total = int(args.train_seconds / (elapsed / 50))
    total = est_total or 10**9
    lr = args.lr * min(1.0, (step + 1) / 300) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
    for pg in opt.param_groups:
        pg["lr"] = lr
    return est_total


def update(model, opt, loss, step, started, log, name):
    """One optimiser step (clipped at 1.0); every 500 steps a log row (step, seconds, loss)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if step % 500 == 0:
        log.append((step, round(time.time() - started, 1), float(loss)))
        print(name, step, round(time.time() - started), float(loss), flush=True)


def train(args, data, vocab, device):
    L = data.shape[1]
    model = Net(vocab, L, args.hidden, args.layers, args.heads, gate=args.gate).to(device)
    if args.init:
        model.load_state_dict({k: v.float() for k, v in torch.load(args.init, map_location=device).items()})
    nparam = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    data_t = torch.from_numpy(data.astype(np.int64))
    pos = torch.arange(L, device=device)
    if args.mode == "ar":
        causal = torch.ones(L + 1, L + 1, dtype=torch.bool, device=device).tril()
    else:
        m2 = bd_train_mask(L, args.block, device)
        pos2 = torch.cat([pos, pos])
    started = time.time()
    step = 0
    log = []
    est_total = None
    while True:
        el = time.time() - started
        if el > args.train_seconds:
            break
        est_total = set_lr(opt, args, step, el, est_total)
        idx = torch.randint(0, len(data_t), (args.batch,), generator=g)
        x0 = data_t[idx].to(device, non_blocking=True)
        with torch.autocast(device if isinstance(device,str) else device.type, dtype=torch.bfloat16):
            if args.mode == "ar":
                inp = torch.cat([torch.full((x0.shape[0], 1), MASK, device=device), x0], 1)  # MASK as BOS
                logits, _ = model(inp[:, :-1], torch.arange(L, device=device)[None], causal[:L, :L])
                tgt = x0
                valid = torch.cat([torch.ones_like(x0[:, :1], dtype=torch.bool), x0[:, :-1] != EOS], 1) & \
                    (torch.cumsum((x0 == EOS).long(), 1) - (x0 == EOS).long() == 0)
                loss = F.cross_entropy(logits.float().reshape(-1, vocab), tgt.reshape(-1), reduction="none")
                loss = (loss.view_as(tgt) * valid).sum() / valid.sum()
            else:
                b = x0.shape[0]
                nb = L // args.block
                # per-block mask rate, clipped to [lo, hi] (BD3-LM's clipped schedule)
                rate = args.lo + (args.hi - args.lo) * torch.rand(b, nb, device=device)
                rate = rate.repeat_interleave(args.block, 1)
                m = torch.rand(b, L, device=device) < rate
                if args.mask_style == "mix":
                    # half the blocks masked as a suffix (what left-to-right decoding inside a block sees)
                    j = (torch.arange(L, device=device) % args.block).float()[None]
                    suffix = j >= (1 - rate) * args.block
                    pick = (torch.rand(b, nb, device=device) < 0.5).repeat_interleave(args.block, 1)
                    m = torch.where(pick, suffix, m)
                xt = torch.where(m, torch.full_like(x0, MASK), x0)
                inp = torch.cat([xt, x0], 1)
                logits, gate = model(inp, pos2[None], m2)
                logits = logits[:, :L].float()
                ce = F.cross_entropy(logits.reshape(-1, vocab), x0.reshape(-1), reduction="none").view_as(x0)
                w = m.float()
                if args.weighting == "elbo":
                    w = w / rate
                loss = (ce * w).sum() / m.sum()
                if gate is not None:
                    with torch.no_grad():
                        samp = torch.distributions.Categorical(logits=logits).sample()
                        right = (samp == x0).float()
                    bce = F.binary_cross_entropy_with_logits(gate[:, :L].float(), right, reduction="none")
                    loss = loss + 0.5 * (bce * m).sum() / m.sum()
        update(model, opt, loss, step, started, log, args.name)
        step += 1
    return model, {"params": nparam, "train_steps": step, "train_seconds": round(time.time() - started, 1),
                   "tokens_per_step": args.batch * (L if args.mode == "ar" else 2 * L), "log": log}


@torch.no_grad()
def sample_ar(model, n, L, temp, device):
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    x = torch.full((n, 1), MASK, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    calls = torch.zeros(n, device=device)
    for i in range(L):
        with torch.autocast(device if isinstance(device,str) else device.type, dtype=torch.bfloat16):
            logits, _ = model(x, torch.arange(i + 1, device=device)[None], causal[: i + 1, : i + 1])
        lg = logits[:, -1].float()
        lg[:, [PAD, MASK]] = -float("inf")
        nxt = torch.distributions.Categorical(logits=lg / temp).sample()
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        calls += (~done).float()
        done |= nxt == EOS
        x = torch.cat([x, nxt[:, None]], 1)
        if done.all():
            break
    return x[:, 1:], calls


@torch.no_grad()
def sample_bd(model, n, L, B, temp, tau, order, device, gate_thr=None):
    """Blocks left to right; inside a block commit every masked position whose confidence > tau
    (at least one: the most confident, or the leftmost for order='l2r'). Confidence is the sampled
    token's probability, or the learned gate when gate_thr is set."""
    nb = L // B
    x = torch.full((n, L), MASK, device=device)
    calls = torch.zeros(n, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    pos = torch.arange(L, device=device)
    full = bd_train_mask(L, B, device)
    for b in range(nb):
        if done.all():
            break
        lo, hi = b * B, (b + 1) * B
        act = (~done).nonzero().squeeze(1)
        # inputs: clean prefix (blocks < b) ++ noisy block b
        for _ in range(B):
            xa = x[act]
            blockx = xa[:, lo:hi]
            masked = blockx == MASK
            still = masked.any(1)
            # stop inside a block once EOS is committed and everything before it is filled
            if not still.any():
                break
            inp = torch.cat([xa[:, :lo], blockx], 1)
            p = torch.cat([pos[:lo], pos[lo:hi]])
            # mask: prefix rows are clean rows of blocks < b; last B rows are noisy rows of block b
            sel = torch.cat([torch.arange(L, 2 * L, device=device)[:lo], torch.arange(lo, hi, device=device)])
            m = full[sel][:, sel]
            with torch.autocast(device if isinstance(device,str) else device.type, dtype=torch.bfloat16):
                logits, gate = model(inp, p[None], m)
            lg = logits[:, lo:].float()
            lg[..., [PAD, MASK]] = -float("inf")
            probs = torch.softmax(lg / temp, -1)
            samp = torch.distributions.Categorical(probs=probs).sample()
            conf = probs.gather(-1, samp[..., None]).squeeze(-1)
            if gate_thr is not None:
                conf = torch.sigmoid(gate[:, lo:].float())
                thr = gate_thr
            else:
                thr = tau
            conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
            commit = (conf > thr) & masked
            if order == "l2r":
                first = masked.float().argmax(1)
                commit[torch.arange(len(act), device=device), first] |= still
            else:
                best = conf.argmax(1)
                commit[torch.arange(len(act), device=device), best] |= still
            newb = torch.where(commit, samp, blockx)
            calls[act] += still.float()
            # EOS handling: positions after the first committed EOS are dropped (PAD)
            is_eos = newb == EOS
            has = is_eos.any(1)
            first_eos = torch.where(has, is_eos.float().argmax(1), torch.full_like(has, B, dtype=torch.long))
            after = torch.arange(B, device=device)[None] > first_eos[:, None]
            newb = torch.where(after, torch.full_like(newb, PAD), newb)
            x[act, lo:hi] = newb
        blk = x[:, lo:hi]
        done |= (blk == EOS).any(1)
    return x, calls


def decode_smiles(ids, itos):
    import selfies as sf
    out = []
    for row in ids.tolist():
        toks = []
        for t in row:
            if t == EOS or t == PAD:
                break
            if t == MASK:
                continue
            toks.append(itos[t])
        try:
            out.append(sf.decoder("".join(toks)) or "")
        except Exception:
            out.append("")
    return out


def frechet(mu1, s1, mu2, s2):
    """Frechet distance of two Gaussians (as fcd / MOSES; scipy's sqrtm without the removed disp)."""
    from scipy import linalg
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class Evaluator:
    def __init__(self, stats_path, mcf, pains, device):
        import fcd
        if not hasattr(np, "row_stack"):  # fcd 1.2.2 calls np.row_stack, gone in numpy 2.5
            np.row_stack = np.vstack
        from rdkit import Chem, RDLogger
        RDLogger.DisableLog("rdApp.*")
        self.fcd, self.Chem = fcd, Chem
        st = np.load(stats_path)
        self.mu, self.sigma = st["mu"], st["sigma"]
        self.model = fcd.load_ref_model()
        self.device = device
        pats = []
        for line in open(mcf).read().splitlines()[1:]:
            pats.append(line.split(",")[1].strip())
        for line in open(pains).read().splitlines():
            pats.append(line.split(",")[0].strip())
        self.patterns = [p for p in (Chem.MolFromSmarts(s) for s in pats) if p is not None]

    def passes(self, mol):
        Chem = self.Chem
        ri = mol.GetRingInfo()
        if ri.NumRings() and any(len(r) >= 8 for r in ri.AtomRings()):
            return False
        if any(a.GetFormalCharge() != 0 for a in mol.GetAtoms()):
            return False
        if any(a.GetSymbol() not in {"C", "N", "S", "O", "F", "Cl", "Br", "H"} for a in mol.GetAtoms()):
            return False
        h = Chem.AddHs(mol)
        return not any(h.HasSubstructMatch(p) for p in self.patterns)

    def __call__(self, smiles):
        Chem = self.Chem
        mols = [Chem.MolFromSmiles(s) if s else None for s in smiles]
        valid = [m for m in mols if m is not None and m.GetNumAtoms() > 0]
        canon = [Chem.MolToSmiles(m) for m in valid]
        act = self.fcd.get_predictions(self.model, canon, batch_size=512, n_jobs=2, device=self.device)
        mu, sig = act.mean(0), np.cov(act.T)
        fcd = frechet(mu, sig, self.mu, self.sigma)
        return {"valid": len(valid) / len(smiles), "unique": len(set(canon)) / max(len(canon), 1),
                "fcd": round(fcd, 3), "filters": float(np.mean([self.passes(m) for m in valid])),
                "heavy": float(np.mean([m.GetNumAtoms() for m in valid]))}


def add_common_args(ap):
    """The model, optimiser and sampling knobs every script of this folder shares."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-seconds", type=float, default=300)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--L", type=int, default=56)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--mode", choices=["ar", "bd"], required=True)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--lo", type=float, default=0.0)
    ap.add_argument("--hi", type=float, default=1.0)
    ap.add_argument("--weighting", default="none")
    ap.add_argument("--gate", action="store_true")
    ap.add_argument("--mask-style", default="random")
    add_common_args(ap)
    ap.add_argument("--decoders", default="")
    ap.add_argument("--data", default=".exp/data/train_selfies.npz")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", default="")
    ap.add_argument("--load", default="")
    ap.add_argument("--init", default="", help="start training from these weights")
    ap.add_argument("--vocab", default="")
    ap.add_argument("--samples", default="", help="write SMILES here instead of evaluating")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    itos = json.load(open(args.vocab or args.data + ".vocab.json"))
    L = args.L
    data = None if args.load else np.load(args.data)["ids"][:, : args.L]
    if args.load:
        model = Net(len(itos), L, args.hidden, args.layers, args.heads, gate=args.gate).to(device)
        model.load_state_dict({k: v.float() for k, v in torch.load(args.load, map_location=device).items()})
        info = {"params": sum(p.numel() for p in model.parameters()), "loaded": args.load, "log": []}
    else:
        model, info = train(args, data, len(itos), device)
    model.eval()
    if args.save:
        torch.save({k: v.half() for k, v in model.state_dict().items()}, args.save)
    data_dir = os.path.dirname(args.data)
    ev = None if args.samples else Evaluator(*(os.path.join(data_dir, f) for f in ("fcd_stats.npz", "mcf.csv", "wehi_pains.csv")), device)
    for dec in args.decoders.split(";"):
        kv = dict(p.split("=") for p in dec.split(",") if p)
        temp = float(kv.get("T", 1.0))
        t0 = time.time()
        torch.manual_seed(args.seed + 1)
        if args.mode == "ar":
            ids, calls = sample_ar(model, args.n, L, temp, device)
        else:
            ids, calls = sample_bd(model, args.n, L, args.block, temp, float(kv.get("tau", 0.9)),
                                   kv.get("order", "conf"), device,
                                   float(kv["gate"]) if "gate" in kv else None)
        smi = decode_smiles(ids.cpu(), itos)
        t1 = time.time()
        if ev is None:
            with open(args.samples, "a") as fh:
                fh.write(json.dumps({"name": args.name, "decoder": dec, "calls_mean": round(float(calls.mean()), 2),
                                     "sample_s": round(t1 - t0, 1), "info": {k: v for k, v in info.items()},
                                     "smiles": smi}) + "\n")
            print(args.name, dec, "calls", round(float(calls.mean()), 2), flush=True)
            continue
        met = ev(smi)
        row = {"name": args.name, "mode": args.mode, "block": args.block, "decoder": dec,
               "calls_mean": round(float(calls.mean()), 2), "sample_s": round(t1 - t0, 1),
               "eval_s": round(time.time() - t1, 1), **met, **{k: v for k, v in info.items() if k != "log"},
               "args": vars(args), "log": info["log"]}
        print(json.dumps({k: row[k] for k in ("name", "decoder", "calls_mean", "fcd", "valid", "unique", "filters", "heavy")}), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
