"""How much a fragment prompt's writing matters to a model: the log-probability of each writing's fixed prefix.

    python3 experiments/fragments/writing_probe.py CHECKPOINT [CHECKPOINT ...] [--task motif_extension] [--out F.jsonl]

Why: a prefix-task template (motif extension, superstructure; issue #24 point 5b) picks one of up to 16 SELFIES
writings of the fragment uniformly (``chem.fragments._writings``: random SMILES ending on the attachment point).
The models were trained on MOSES's canonical writings, and `states_probe.py --writing random` scores random
writings ~4x worse per token. If the writings of one fragment differ by many nats under a model, the uniform pick
sends most samples through prefixes the model finds unlikely; sampling the writing in proportion to the model's
own prefix probability instead samples the model's distribution conditioned on "the molecule starts with this
fragment, written from some atom to its attachment point".

For every prompt of the task in the shipped MOSES suite and every writing the template could pick, it scores
log p(prefix) (every fixed symbol, left to right, from the start) plus log P(the open end's first symbol is one
the template allows), under each checkpoint: a causal one by teacher forcing, a refine (block) one through its
exact left-to-right conditionals (``states_forward``, as states_probe.py). One JSON line per (checkpoint, prompt).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import selfies as sf
import torch
import torch.nn.functional as F
from imadarem.chem import fragments as fr
from imadarem.chem.suites import load_suite
from imadarem.plugins.tokenizers.selfies import atom_bond
from imadarem.training.checkpoint import build_model, family_name, load_checkpoint
from imadarem.training.model import states_forward


def candidates(case_prompt: str, task: str, vocabulary) -> list[tuple[list[str], frozenset[str]]]:
    """Each writing a template may pick for this prompt: (its fixed prefix symbols, the open end's allowed first
    symbols). Only single-attachment-point decorations and superstructures (the prefix tasks)."""
    parsed = fr.parse_fragment_prompt(case_prompt)
    alphabet = fr._Alphabet(vocabulary)
    if parsed.kind == "superstructure":
        writings = [w for site in fr._open_sites(parsed.fragments[0]) for w in fr._writings(site, False)]
    else:
        writings = list(fr._writings(fr._placed(parsed.fragments[0]), False))
    try:
        usable = alphabet.writable(writings, parsed.fragments[0])
    except fr._Missing:
        flat = fr._without_stereo(parsed.fragments[0])
        writings = ([w for site in fr._open_sites(flat) for w in fr._writings(site, False)]
                    if parsed.kind == "superstructure" else list(fr._writings(fr._placed(flat), False)))
        usable = alphabet.writable(writings, flat)
    out = []
    for writing in usable:
        tree = fr._tree(writing)
        if any(item[0] == "atom" and fr._XE.fullmatch(item[1]) for item in tree[:-1]) or any(
                item[0] == "branch" for item in tree if _holds_xenon(item)):
            continue  # more than one attachment point: fixed-length blanks inside, not a pure prefix
        bond = atom_bond(tree.pop()[1])[0]
        out.append((fr._write(tree), alphabet.first(alphabet.atoms, bond)))
    return out


def _holds_xenon(item) -> bool:
    if item[0] != "branch":
        return False
    return any((x[0] == "atom" and fr._XE.fullmatch(x[1])) or _holds_xenon(x) for x in item[2])


@torch.no_grad()
def score(model, family: str, rows: list[tuple[list[str], frozenset[str]]]) -> list[float]:
    """log p(prefix) + log P(first open-end symbol allowed) for each (prefix, allowed)."""
    tok, sp, L = model.tokenizer, model.special, model.config.max_seq_len
    data, lengths, allowed_ids = [], [], []
    for prefix, allowed in rows:
        ids = tok.symbols_to_ids(prefix, "probe")
        lengths.append(len(ids))
        allowed_ids.append(tok.symbols_to_ids(sorted(allowed), "probe"))
        data.append(ids + [sp.eos] + [sp.pad] * (L - len(ids) - 1))
    clean = torch.tensor(data)
    if family == "causal":
        inputs = torch.cat([torch.full_like(clean[:, :1], sp.mask), clean[:, :-1]], 1)
        logits = model.teacher_forcing(inputs)[0].float()
        pos = torch.arange(L)
    else:
        bs = model.config.block_size
        out, lay = states_forward(model.forward_train, clean, sp.mask, model.config.hidden_size, bs)
        exact = lay.positions == lay.start
        logits, pos = out["logits"][:, exact].float(), lay.positions[exact]
    logp = F.log_softmax(logits, -1)
    result = []
    for r, (n, ids) in enumerate(zip(lengths, allowed_ids)):
        at = {int(p): i for i, p in enumerate(pos.tolist())}
        prefix = sum(float(logp[r, at[p], clean[r, p]]) for p in range(n))
        first = float(torch.logsumexp(logp[r, at[n], ids], 0))
        result.append(prefix + first)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--task", default="motif_extension", choices=("motif_extension", "superstructure_generation"))
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(2)
    cases = [c for c in load_suite("moses") if c.task == a.task]
    sink = open(a.out, "a") if a.out else None
    for path in a.checkpoints:
        ckpt = load_checkpoint(path)
        model = build_model(ckpt, "ema").eval()
        family = family_name(ckpt.state)
        spreads, gains = [], []
        for case in cases:
            rows = candidates(case.prompt, a.task, model.tokenizer.symbols)
            logps = np.array(score(model, family, rows))
            # uniform pick's expected log p against the model's own weighting's (the mean under softmax(logps))
            w = np.exp(logps - logps.max())
            w /= w.sum()
            row = {"checkpoint": path, "task": a.task, "name": case.name, "prompt": case.prompt,
                   "writings": len(rows), "logp": [round(x, 3) for x in logps],
                   "spread": round(float(logps.max() - logps.min()), 3),
                   "uniform_mean": round(float(logps.mean()), 3), "weighted_mean": round(float((w * logps).sum()), 3)}
            spreads.append(row["spread"])
            gains.append(row["weighted_mean"] - row["uniform_mean"])
            if sink:
                sink.write(json.dumps(row) + "\n")
        print(json.dumps({"checkpoint": path, "task": a.task, "prompts": len(cases),
                          "median_spread": round(float(np.median(spreads)), 2),
                          "mean_gain_weighted_over_uniform": round(float(np.mean(gains)), 2)}), flush=True)


if __name__ == "__main__":
    main()


def _site(writing: tuple[str, ...]) -> str:
    """The canonical SMILES a writing spells (its xenon included): the same for every writing of one site."""
    from rdkit import Chem

    return Chem.MolToSmiles(Chem.MolFromSmiles(sf.decoder("".join(writing))))


def weigh_writings(checkpoint: str, temperature: float = 1.0, per_site: bool = False) -> None:
    """Make ``chem.fragments`` pick a prefix-task writing with probability ∝ p_model(prefix)^(1/temperature) under
    ``checkpoint`` instead of uniformly (an experiment: patched in a process that then runs the suite); with
    ``per_site`` each site (a superstructure's atom it grows from) keeps the share the uniform pick gives it. Writings with
    more than one attachment point (scaffold decoration) and a linker's second fragment keep the uniform pick."""
    torch.set_num_threads(1)
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt, "ema").eval()
    family = family_name(ckpt.state)
    alphabet = fr._Alphabet(model.tokenizer.symbols)
    uniform, cache = fr._pick, {}

    def pick(rng, options):
        options = tuple(options)
        is_prefix = (options and isinstance(options[0], tuple) and fr._XE.fullmatch(options[0][-1])
                     and not any(fr._XE.fullmatch(s) for w in options for s in w[:-1]))
        if not is_prefix:
            return uniform(rng, options)
        if options not in cache:
            rows = []
            for writing in options:
                tree = fr._tree(writing)
                bond = atom_bond(tree.pop()[1])[0]
                rows.append((fr._write(tree), alphabet.first(alphabet.atoms, bond)))
            logp = np.array(score(model, family, rows)) / temperature
            # writings of one site (the same molecule with its xenon) share the site's uniform share: the model
            # picks how a site is written, not which site grows (a superstructure's sites stay uniform)
            sites = [_site(writing) for writing in options] if per_site else [0] * len(options)
            probs = np.zeros(len(options))
            for site in set(sites):
                at = np.array([s == site for s in sites])
                w = np.exp(logp[at] - logp[at].max())
                probs[at] = w / w.sum() * at.sum() / len(options)
            cache[options] = probs
        return options[int(rng.choice(len(options), p=cache[options]))]

    fr._pick = pick
