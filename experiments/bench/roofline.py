"""A roofline of the decode file's CUDA calls (issue #26 point 4): achieved FLOP/s and bytes/s per batch size
against a GPU's limits, from `imadarem bench` rows (bench.json) and the model's shape.

    python3 experiments/bench/roofline.py BENCH.json[:LABEL[:GPU]] ... -o docs/roofline.png --json rows.json

GPU is h100 or h200 (the ceilings drawn). The work of one call is counted from the shape, not read from
hardware counters: a row of a draft-and-verify call runs D + 1 positions through the trunk; FLOPs = 2 x
parameters per position (the weights' multiply-adds) + the attention over all ``cache_len`` slots (4 x
layers x cache_len x hidden per position: QK^T and AV, as the decode file computes them over every slot);
bytes = the least a call must move in fp16: the weights once, every row's key and value cache read once,
the new slots written once, and the int64 state in and out. What the call really moves (until 2026-12-07 the
cache copied from one bound buffer to the other; unfused intermediates) is more, which is the gap the figure
shows. The draft heads run at one position a row but are counted at all D + 1 (~3% too much for the bundled
model). A row of a whole-batch run (before in-flight batching) is charged as a full bucket although some calls
ran smaller buckets. bench.json holds no layer count or width: ``--layers`` and ``--hidden`` (the bundled
model's by default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: dense fp16/bf16 tensor-core peak and HBM bandwidth, the vendors' figures (H100 SXM, H200 SXM), and what a
#: plain bf16 GEMM and a device-to-device copy measured on the lent machines (/work/.library/device/KINDS.md)
GPUS = {
    "h100": {"name": "H100 SXM", "flops": 989e12, "bytes": 3.35e12, "measured_flops": 798e12, "measured_bytes": 3.0e12},
    "h200": {"name": "H200 SXM", "flops": 989e12, "bytes": 4.8e12, "measured_flops": 798e12, "measured_bytes": 4.3e12},
}


def work(rows: int, positions: int, params: int, layers: int, hidden: int, cache_len: int, seq: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one call of ``rows`` rows, ``positions`` trunk positions each."""
    tokens = rows * positions
    flops = 2.0 * params * tokens + 4.0 * layers * cache_len * hidden * tokens
    cache_read = 2 * layers * rows * cache_len * hidden * 2
    cache_write = 2 * layers * tokens * hidden * 2
    state = 2 * rows * (seq + positions + 3) * 8
    return flops, float(2 * params + cache_read + cache_write + state)


def rows_of(path: str, label: str, gpu: str, engines: tuple[str, ...], layers: int, hidden: int) -> list[dict]:
    bench = json.loads(Path(path).read_text())
    params, drafts, seq = bench["parameters"], bench["drafts"], bench["max_seq_len"]
    out = []
    for r in bench["rows"]:
        if r["provider"] != "cuda" or r["engine"] not in engines:
            continue
        positions = 1 if "l2r" in r["engine"] else drafts + 1
        cache_len = seq + 1 + (0 if "l2r" in r["engine"] else drafts)
        flops, nbytes = work(r["batch"], positions, params, layers, hidden, cache_len, seq)
        sec = r["step_p50_ms"] / 1e3
        g = GPUS[gpu]
        out.append({"label": label, "gpu": gpu, "engine": r["engine"], "batch": r["batch"],
                    "mol_per_s": r["seq_per_s"], "step_ms": r["step_p50_ms"], "flops_per_call": flops,
                    "bytes_per_call": nbytes, "intensity": flops / nbytes, "flop_per_s": flops / sec,
                    "bytes_per_s": nbytes / sec, "of_peak_flops": flops / sec / g["flops"],
                    "of_peak_bytes": nbytes / sec / g["bytes"],
                    "roof_ms": 1e3 * max(flops / g["flops"], nbytes / g["bytes"])})
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 5))
    x = np.logspace(0, 4, 200)
    for gpu, style in (("h100", ":"), ("h200", "-")):
        g = GPUS[gpu]
        if any(r["gpu"] == gpu for r in rows):
            ax.plot(x, np.minimum(g["flops"], g["bytes"] * x), "k" + style, lw=1,
                    label=f"{g['name']} roof ({g['flops'] / 1e12:.0f} TFLOP/s, {g['bytes'] / 1e12:.2f} TB/s)")
    markers = "os^Dv"
    for i, (label, engine) in enumerate(sorted({(r["label"], r["engine"]) for r in rows})):
        pts = sorted((r for r in rows if r["label"] == label and r["engine"] == engine), key=lambda r: r["batch"])
        ax.plot([r["intensity"] for r in pts], [r["flop_per_s"] for r in pts], marker=markers[i % 5], lw=1,
                label=f"{engine}, {label}")
        for r in pts:
            ax.annotate(str(r["batch"]), (r["intensity"], r["flop_per_s"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs per byte (least traffic of a call, fp16)")
    ax.set_ylabel("achieved FLOP/s (counted work / median call time)")
    ax.set_title("Decode-file calls on CUDA against the roofline (labels: batch size)")
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("benches", nargs="+", help="BENCH.json[:LABEL[:GPU]]")
    p.add_argument("--engines", default="ort-decode-fp16,ort-decode-l2r-fp16")
    p.add_argument("-o", "--out", help="write the figure (PNG)")
    p.add_argument("--json", help="write the rows")
    p.add_argument("--layers", type=int, default=6, help="the model's layers [the bundled model's]")
    p.add_argument("--hidden", type=int, default=256, help="the model's width [the bundled model's]")
    a = p.parse_args()
    rows = []
    for spec in a.benches:
        path, label, gpu = (spec.split(":") + [None, None])[:3]
        rows += rows_of(path, label or Path(path).parent.name, gpu or "h200", tuple(a.engines.split(",")),
                        a.layers, a.hidden)
    print(f"{'run':<28} {'engine':<20} {'batch':>5} {'ms':>7} {'roof ms':>8} {'TFLOP/s':>8} {'% peak':>7} "
          f"{'GB/s':>7} {'% HBM':>6}")
    for r in rows:
        print(f"{r['label']:<28} {r['engine']:<20} {r['batch']:>5} {r['step_ms']:7.3f} {r['roof_ms']:8.3f} "
              f"{r['flop_per_s'] / 1e12:8.2f} {r['of_peak_flops']:7.1%} {r['bytes_per_s'] / 1e9:7.0f} "
              f"{r['of_peak_bytes']:6.1%}")
    if a.out:
        plot(rows, a.out)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
