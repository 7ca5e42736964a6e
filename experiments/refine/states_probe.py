"""How well a checkpoint models x_p given x_<p (the left-to-right conditional), on MOSES test molecules.

    python3 experiments/refine/states_probe.py CHECKPOINT [CHECKPOINT ...] [--n 2000]

Why: on prefix prompts (motif extension, superstructure: issue #24 point 5b) and de novo, draft-and-verify samples
a block model's exact left-to-right conditionals, so their NLL is what separates the refine model from the causal
baseline there. A ``refine`` (block) checkpoint is read through the states rows of the block objective
(``training.model.states_forward``: each copy is the state a decoder reaches, checked in tests/test_block_refine.py),
a ``causal`` one by teacher forcing; both score the same tokens (every position up to and including EOS). Prints one
JSON line per checkpoint: the mean NLL per token and, for a block model, per offset inside the block.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from imadarem.runtime.errors import ImadaremError
from imadarem.training.checkpoint import build_model, family_name, load_checkpoint
from imadarem.training.model import states_forward


def rows(tokenizer, special, length: int, n: int, source: Path, writing: str = "file") -> torch.Tensor:
    """The first ``n`` molecules that fit, as the file writes them or (``writing="random"``) each in one random
    SMILES order (RDKit, fixed seed): fragment prompts reach a model in such writings, not the canonical ones
    it was trained on."""
    rewrite = _random_writer() if writing == "random" else (lambda smiles: smiles)
    out = []
    with gzip.open(source, "rt") as fh:
        next(fh)  # header
        for line in fh:
            try:
                ids = tokenizer.encode(rewrite(line.split(",")[0].strip()))
            except (ValueError, ImadaremError):  # a writing the tokenizer cannot take (unknown symbol): skipped
                continue
            if len(ids) + 1 <= length:
                out.append(ids + [special.eos] + [special.pad] * (length - len(ids) - 1))
            if len(out) == n:
                break
    return torch.tensor(out)


def _random_writer():
    from rdkit import Chem

    rng = np.random.default_rng(0)

    def rewrite(smiles: str) -> str:
        mol = Chem.MolFromSmiles(smiles)
        return Chem.MolToRandomSmilesVect(mol, 1, randomSeed=int(rng.integers(1 << 30)))[0]
    return rewrite


KINDS = ("atom", "ring", "ring_size", "branch", "branch_size", "end")


def token_kinds(tokenizer, special, data: torch.Tensor) -> torch.Tensor:
    """Each token's kind (an index into KINDS): SELFIES atoms, the ring and branch symbols, the index symbols
    after them (a ring's size, a branch's length: one for [Ring1]/[Branch1], two for ...2, three for ...3),
    and the end token. Where a ring's size is wrong the molecule gets a macrocycle or a bridge, both of which
    cost SA (issue #24's quality)."""
    names = [""] * (int(data.max()) + 1)
    for symbol in tokenizer.symbols:
        names[tokenizer.symbols_to_ids([symbol], symbol)[0]] = symbol
    out = np.zeros(tuple(data.shape), dtype=np.int64)  # filled on the host, element by element, then moved once
    for r, row in enumerate(data.tolist()):
        size = (0, 0)  # (kind index of the pending size symbols, how many remain)
        for c, t in enumerate(row):
            if t == special.eos:
                out[r, c] = KINDS.index("end")
                break
            name = names[t]
            if size[1]:
                out[r, c], size = size[0], (size[0], size[1] - 1)
            elif "Ring" in name or "Branch" in name:
                group = "ring" if "Ring" in name else "branch"
                out[r, c] = KINDS.index(group)
                size = (KINDS.index(group + "_size"), int(name.rstrip("]")[-1]))
            else:
                out[r, c] = KINDS.index("atom")
    return torch.from_numpy(out).to(data.device)


@torch.no_grad()
def probe(path: str, n: int, source: Path, batch: int = 100, weights: str = "ema", device: str = "cpu",
          writing: str = "file") -> dict:
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, weights).eval().to(device)
    sp, family = model.special, family_name(ckpt.state)
    L = model.config.max_seq_len
    data = rows(model.tokenizer, sp, L, n, source, writing).to(device)
    ends = (data == sp.eos).float().argmax(1)
    bs = getattr(model.config, "block_size", 4)  # a causal model's offsets: those of the refine models' blocks of 4
    total, count = 0.0, 0
    by_offset = np.zeros((2, 8))
    kinds = token_kinds(model.tokenizer, sp, data)
    by_kind = np.zeros((2, len(KINDS)))
    for i in range(0, len(data), batch):
        clean, e = data[i:i + batch], ends[i:i + batch]
        if family == "causal":
            inputs = torch.cat([torch.full_like(clean[:, :1], sp.mask), clean[:, :-1]], 1)
            logits = model.teacher_forcing(inputs)[0]
            nll = F.cross_entropy(logits.float().transpose(1, 2), clean, reduction="none")
            pos = torch.arange(L, device=device)
        else:
            out, lay = states_forward(model.forward_train, clean, sp.mask, model.config.hidden_size, bs)
            exact = lay.positions == lay.start  # the slot of each copy that holds its exact conditional
            logits = out["logits"][:, exact]
            pos = lay.positions[exact]
            nll = F.cross_entropy(logits.float().transpose(1, 2), clean[:, pos], reduction="none")
        live = pos[None] <= e[:, None]
        total += float((nll * live).sum())
        count += int(live.sum())
        for k in range(bs):
            at = (pos % bs == k)[None] & live
            by_offset[0, k] += float((nll * at).sum())
            by_offset[1, k] += int(at.sum())
        kind = kinds[i:i + batch][:, pos]
        for k in range(len(KINDS)):
            at = (kind == k) & live
            by_kind[0, k] += float((nll * at).sum())
            by_kind[1, k] += int(at.sum())
    return {"checkpoint": path, "family": family, "molecules": len(data), "tokens": count,
            "nll": round(total / count, 4), "nll_by_offset": [round(by_offset[0, k] / by_offset[1, k], 4) for k in range(bs)],
            # summed (not mean) NLL by kind: where a gap between two models lies, in nats per molecule
            "nll_sum_by_kind": {name: round(by_kind[0, k] / len(data), 4) for k, name in enumerate(KINDS)},
            "tokens_by_kind": {name: int(by_kind[1, k]) for k, name in enumerate(KINDS)}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--writing", choices=("file", "random"), default="file",
                   help="random: each molecule in one random SMILES order (how fragment prompts are written)")
    p.add_argument("--source", default=str(Path.home() / ".cache/imadarem/moses/test.csv.gz"))
    a = p.parse_args()
    torch.set_num_threads(2)
    for path in a.checkpoints:
        print(json.dumps({**probe(path, a.n, Path(a.source), weights=a.weights, device=a.device, writing=a.writing),
                          "weights": a.weights, "writing": a.writing}), flush=True)


if __name__ == "__main__":
    main()
