"""Where a decode file's CUDA call spends its time: every kernel's duration under Nsight Compute (issue #26).

On the GPU machine (onnxruntime-gpu, torch for cudaProfilerStart/Stop, ncu on the PATH):

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --page raw \
        --log-file ncu.csv python3 experiments/bench/profile_cuda.py run FILE --batch 4096

``run`` warms up (sessions, CUDA graph capture) on two batches, then profiles one batch of molecules (its
calls replay the captured graphs; ncu times each kernel node alone, serialised). Here:

    python3 experiments/bench/profile_cuda.py summary ncu.csv --calls N

sums the kernel time by kernel name (the top ``--top``) and per call.
"""

from __future__ import annotations

import argparse
import csv
import re
import time
from collections import defaultdict


def run(a) -> None:
    import torch
    from imadarem.runtime import Generator

    gen = Generator(a.file, provider="cuda")
    gen.generate(a.batch * 2, batch_size=a.batch, seed=1)  # sessions, graphs, allocations
    torch.cuda.init()
    cudart = torch.cuda.cudart()
    cudart.cudaProfilerStart()
    t = time.perf_counter()
    gen.generate(a.batch, batch_size=a.batch, seed=2)
    cudart.cudaProfilerStop()
    print(f"profiled batch {a.batch}: {time.perf_counter() - t:.2f} s under the profiler", flush=True)


def short(name: str) -> str:
    """A kernel's name without template arguments and parameter lists: what it is, not how it was built."""
    name = re.sub(r"\(.*\)$", "", name)
    while "<" in name:
        new = re.sub(r"<[^<>]*>", "", name)
        if new == name:
            break
        name = new
    return name.replace("void ", "").strip()


def summary(a) -> None:
    lines = open(a.csv).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    rows = list(csv.DictReader(lines[start:]))
    rows = [r for r in rows if r.get("gpu__time_duration.sum", "").replace(".", "").replace(",", "").isdigit()]
    total = defaultdict(float)
    count = defaultdict(int)
    for r in rows:
        ns = float(r["gpu__time_duration.sum"].replace(",", ""))
        k = short(r["Kernel Name"])
        total[k] += ns
        count[k] += 1
    grand = sum(total.values())
    print(f"{len(rows)} kernels, {grand / 1e6:.2f} ms of kernel time, {grand / 1e6 / a.calls:.3f} ms a call "
          f"({a.calls} calls)")
    print(f"{'share':>6} {'ms/call':>8} {'launches/call':>13}  kernel")
    for k, ns in sorted(total.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"{ns / grand:6.1%} {ns / 1e6 / a.calls:8.3f} {count[k] / a.calls:13.1f}  {k[:110]}")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run")
    r.add_argument("file")
    r.add_argument("--batch", type=int, default=4096)
    s = sub.add_parser("summary")
    s.add_argument("csv")
    s.add_argument("--calls", type=float, required=True, help="model calls in the profiled batch")
    s.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    run(a) if a.verb == "run" else summary(a)


if __name__ == "__main__":
    main()
