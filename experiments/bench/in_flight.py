"""In-flight batching against whole batches, on one decode file, in one process (issue #26, point 2).

    python3 experiments/bench/in_flight.py FILE --provider cpu --batches 64 --threads 2 --out DIR
    python3 experiments/bench/in_flight.py FILE --provider cuda --batches 256,1024,4096 --look-every 0.0625

For each batch size: a warm-up, then ``--repeats`` alternating timed runs of ``--per-run`` batches' worth
of molecules with ``Generator.in_flight`` off and on (same seeds, so the same molecules; checked). Writes
DIR/in_flight.json and prints a table: molecules/s, model_calls (sequential calls of the run / (molecules /
batch)) and calls_per_molecule, and the ratio of in flight to whole batches.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from imadarem.runtime import Generator
from imadarem.runtime.results import LoopTimings


def timed(gen: Generator, in_flight: bool, n: int, batch: int, seed: int) -> dict:
    gen.in_flight = in_flight
    tm = LoopTimings()
    started = time.perf_counter()
    parts = list(gen.iter_results(n, seed=seed, batch_size=batch, timings=tm))
    wall = time.perf_counter() - started
    ids = np.concatenate([p.ids for p in parts])
    calls = np.concatenate([p.steps for p in parts])
    return {"wall_s": wall, "mol_per_s": n / wall, "model_calls": len(tm.step_seconds) * batch / n,
            "calls_per_molecule": float(calls.mean()), "ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--batches", default="64")
    ap.add_argument("--per-run", type=int, default=16, help="batches' worth of molecules per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default=".")
    ap.add_argument("--look-every", type=float,
                    help="CUDA: the share of a bucket's rows that must end before the host looks back "
                         "(CudaDecoding.look_every; default: the runtime's)")
    args = ap.parse_args()
    if args.look_every is not None:
        from imadarem.runtime.formats.decode import CudaDecoding

        CudaDecoding.look_every = args.look_every
    gen = Generator(args.file, provider=args.provider, threads=args.threads)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        n = batch * args.per_run
        timed(gen, True, batch * 2, batch, 99)  # warm-up: sessions, CUDA graph capture
        timed(gen, False, batch, batch, 99)
        runs = {False: [], True: []}
        for r in range(args.repeats):
            for flag in (False, True):
                runs[flag].append(timed(gen, flag, n, batch, r))
        for r in range(args.repeats):
            assert (runs[False][r]["ids"] == runs[True][r]["ids"]).all(), "in flight changed a molecule"
        row = {"batch": batch, "molecules_per_run": n}
        for flag, name in ((False, "whole"), (True, "in_flight")):
            best = {k: float(np.median([x[k] for x in runs[flag]])) for k in ("mol_per_s", "model_calls",
                                                                                  "calls_per_molecule")}
            row[name] = best
        row["speedup"] = row["in_flight"]["mol_per_s"] / row["whole"]["mol_per_s"]
        rows.append(row)
        print(f"batch {batch}: whole {row['whole']['mol_per_s']:.1f} mol/s ({row['whole']['model_calls']:.2f} calls"
              f"/batch) | in flight {row['in_flight']['mol_per_s']:.1f} mol/s ({row['in_flight']['model_calls']:.2f}"
              f") | per molecule {row['in_flight']['calls_per_molecule']:.2f} | x{row['speedup']:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "in_flight.json").write_text(json.dumps({
        "file": args.file, "provider": args.provider, "threads": args.threads, "repeats": args.repeats,
        "look_every": args.look_every,
        "machine": platform.processor() or platform.machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
