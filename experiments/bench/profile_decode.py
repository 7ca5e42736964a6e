"""Where a decode file's CPU time goes: onnxruntime's profiler, summed by operator type (issue #26, point 3).

    python3 experiments/bench/profile_decode.py runtime/models/default.onnx --precision int8 --batch 64 -n 192

Exports the model file's weights as a decode file (``export_decode``, as ``imadarem bench`` builds its
``ort-decode-*`` rows), runs it through the one Generator with onnxruntime's profiler on, and prints the share of
kernel time per operator type (and the top nodes), plus the wall time per call. ``--drafts 0`` profiles the
one-token decode file.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import imadarem.runtime.session as session_module
from imadarem.export.decode_export import export_decode
from imadarem.export.onnx_import import causal_from_onnx
from imadarem.runtime.generator import Generator
from imadarem.runtime.results import LoopTimings


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--precision", default="int8")
    p.add_argument("--drafts", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("-n", type=int, default=192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--keep", help="write the decode file here (else a temporary folder)")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp())
    model, _ = causal_from_onnx(a.model)
    path = Path(a.keep) if a.keep else work / f"decode-{a.precision}.onnx"
    export_decode(model, path, a.drafts, a.precision, {"profile": "1"})

    plain = session_module.session_options

    def profiled(threads=None):
        opts = plain(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(work / "prof")
        return opts
    session_module.session_options = profiled

    gen = Generator(str(path), threads=a.threads)
    gen.generate(a.batch, seed=99, batch_size=a.batch, decode=False)  # warm-up
    tm = LoopTimings()
    started = time.perf_counter()
    gen.generate(a.n, seed=0, batch_size=a.batch, timings=tm, decode=False)
    wall = time.perf_counter() - started
    trace = Path(gen.model.session.end_profiling())
    events = json.loads(trace.read_text())
    by_op: collections.Counter = collections.Counter()
    by_node: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            by_node[e["name"][: -len("_kernel_time")]] += e["dur"]
    total = sum(by_op.values())
    calls, in_run = len(tm.step_seconds), sum(tm.run_seconds)
    print(f"{a.n} molecules, batch {a.batch}, {a.threads} threads: {a.n / wall:.1f} mol/s, wall {wall:.2f} s, "
          f"{calls} calls ({1e3 * wall / calls:.1f} ms each, {100 * in_run / wall:.0f}% in session.run), kernel time {total / 1e6:.2f} s (includes the warm-up)")
    for op, us in by_op.most_common(a.top):
        print(f"  {op:32s} {100 * us / total:5.1f}%")
    print("top nodes:")
    for node, us in by_node.most_common(a.top):
        print(f"  {node[:60]:60s} {100 * us / total:5.1f}%")


if __name__ == "__main__":
    main()
