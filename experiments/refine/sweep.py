"""FCD against mean model calls for refinement models: every selector and its options, one JSON row each.

    python3 experiments/refine/sweep.py MODEL.onnx -n 2000 --tag refine-b4 \
        --try gate threshold=0.5 --try gate threshold=0.8 --try maskgit --try l2r

Each ``--try`` is a selector name and its options (as ``imadarem-run -o``); ``--steps K`` sets the step budget
for every try. ``--generate-only DIR`` writes each try's molecules and row to DIR without scoring (the lent GPU
machine's 16 CPU cores generate 10,000 molecules in a few minutes); ``--score DIR`` scores them here. Rows (model, tag, selector, options, steps, n, seed, calls = mean model calls per molecule,
MOSES's metrics) are appended to experiments/refine/results.jsonl. Seed 0 unless given.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from imadarem.runtime.generator import Generator

RESULTS = Path(__file__).with_name("results.jsonl")


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def generate(a):
    """Each try's molecules and its row (model, tag, selector, options, calls, generate_seconds, texts)."""
    gen = Generator(a.model, threads=a.threads)
    for i, (selector, *opts) in enumerate(a.tries):
        options = {k: parse_value(v) for k, v in (o.split("=", 1) for o in opts)}
        t0 = time.perf_counter()
        samples = gen.generate(a.n, selector=selector, steps=a.steps, seed=a.seed, batch_size=500, **options)
        seconds = time.perf_counter() - t0
        row = {"model": a.model, "tag": a.tag, "selector": selector, "options": options, "steps": a.steps,
               "n": a.n, "seed": a.seed, "calls": float(np.mean([s.steps for s in samples])),
               "generate_seconds": round(seconds, 1), "texts": [s.text for s in samples]}
        print(json.dumps({k: v for k, v in row.items() if k != "texts"}), flush=True)
        if a.generate_only:
            Path(a.generate_only).mkdir(parents=True, exist_ok=True)
            Path(a.generate_only, f"try-{i:02d}.json").write_text(json.dumps(row))
        yield row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--tag", default="")
    p.add_argument("--threads", type=int, help="onnxruntime threads [default: every core]")
    p.add_argument("--no-fcd", action="store_true")
    p.add_argument("--try", dest="tries", nargs="+", action="append", metavar="SELECTOR [K=V ...]")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--generate-only", metavar="DIR",
                   help="write each try's molecules and row to DIR (e.g. on the lent GPU machine's CPU cores)")
    p.add_argument("--score", metavar="DIR", help="score the tries written by --generate-only (no --try needed)")
    a = p.parse_args()
    if a.score:
        pending = [json.loads(f.read_text()) for f in sorted(Path(a.score).glob("*.json"))]
    else:
        if not a.tries:
            p.error("--try is required unless --score is given")
        pending = list(generate(a))
    if a.generate_only:
        return
    from imadarem.training.evaluation.molecules import MosesScorer  # RDKit: not needed to generate

    scorer = MosesScorer(with_fcd=not a.no_fcd, n_jobs=2)
    for row in pending:
        texts = row.pop("texts")
        row.update(scorer(texts, row["seed"]))
        keep = ("valid", "unique@10000", "FCD/Test", "SNN/Test", "Filters", "Novelty", "IntDiv")
        print(json.dumps({k: row[k] for k in ("tag", "selector", "options", "calls") + keep if k in row}), flush=True)
        with open(a.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
