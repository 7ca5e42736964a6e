"""Paired comparison of two models' `imadarem eval fragments --json` rows, prompt by prompt (issue #24, point 5b).

    python3 experiments/fragments/paired.py OURS.json[.gz][:MODEL] BASELINE.json[.gz][:MODEL] [--metric quality]
        [--also OURS2 BASELINE2]   # another seed's files, merged in

Each side is a file written by `imadarem eval fragments --json` (or experiments/device/fragments.py) and, after a
colon, the model as its row names it (default: the file's first row). For every task and seed both sides ran, it
prints each side's mean over prompts and the mean difference (ours minus baseline) with its standard error over
the prompts: a suite-level gap larger than about two standard errors is more than sampling noise.
"""

from __future__ import annotations

import argparse
import gzip
import json

import numpy as np


def rows(spec: str) -> dict[tuple[str, str, int], float]:
    path, _, model = spec.partition(":")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        results = json.load(fh)
    result = next((r for r in results if not model or str(r["model"]) == model), None)
    if result is None:
        raise SystemExit(f"{path}: no row for model {model!r}; it holds {[r['model'] for r in results]}")
    return {(p["task"], p["name"], p["seed"]): p for p in result["prompts"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ours")
    p.add_argument("baseline")
    p.add_argument("--metric", default="quality")
    p.add_argument("--also", nargs=2, action="append", default=[], metavar=("OURS", "BASELINE"),
                   help="a further pair of files (another seed) merged in, same form as the first")
    a = p.parse_args()
    ours, base = rows(a.ours), rows(a.baseline)
    for more_ours, more_base in a.also:
        ours.update(rows(more_ours))
        base.update(rows(more_base))
    both = sorted(set(ours) & set(base))
    print("| task | seed | prompts | ours | baseline | ours - baseline (± s.e.) |\n|---|---|---|---|---|---|")
    for task in sorted({k[0] for k in both}):
        for seed in sorted({k[2] for k in both if k[0] == task}):
            keys = [k for k in both if k[0] == task and k[2] == seed]
            x = np.array([ours[k].get(a.metric, 0.0) for k in keys]) * 100
            y = np.array([base[k].get(a.metric, 0.0) for k in keys]) * 100
            d = x - y
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            print(f"| {task} | {seed} | {len(keys)} | {x.mean():.1f} | {y.mean():.1f} | {d.mean():+.1f} ± {se:.1f} |")
    # Is a gap spread over the prompts or held by some? Over two seeds, the per-prompt differences correlate
    # near 0 when they are sampling noise, and near 1 when some prompts favour one model (a prompt effect).
    for task in sorted({k[0] for k in both}):
        seeds = sorted({k[2] for k in both if k[0] == task})
        if len(seeds) < 2:
            continue
        names = sorted({k[1] for k in both if k[0] == task and k[2] == seeds[0]}
                       & {k[1] for k in both if k[0] == task and k[2] == seeds[1]})
        d0, d1 = ([ours[(task, n, s)].get(a.metric, 0.0) - base[(task, n, s)].get(a.metric, 0.0) for n in names]
                  for s in seeds[:2])
        if len(names) > 2:
            print(f"{task}: per-prompt differences, seed {seeds[0]} against seed {seeds[1]}: "
                  f"correlation {np.corrcoef(d0, d1)[0, 1]:.2f} over {len(names)} prompts")


if __name__ == "__main__":
    main()
