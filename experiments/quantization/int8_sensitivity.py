"""Which weight MatMuls of a causal step file lose most when statically quantised to int8 (issue #23).

For an fp32 causal step file (``imadarem export RUN -o m.onnx --dtype fp32``), quantise it as ``export --dtype
int8`` does (static QDQ, per-channel int8 weights, uint8 activations with MinMax scales from the exporter's own
calibration feeds), once with every weight MatMul and once with each group of them left in float, and print
the logits' max and mean absolute difference from fp32 on fresh feeds. Optionally write one variant:

    python experiments/quantization/int8_sensitivity.py .runs/cd-fp32.onnx [--write GROUP OUT.onnx]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from imadarem.export.causal_export import calibration_feeds
from imadarem.export.onnx_export import _preprocessed, write_with_metadata
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

#: groups by weight shape for the 256-wide, 6-layer causal model (hidden h=256, MLP 4h, vocabulary 30)
GROUPS = {
    "all": lambda shape: True,
    "no-fc2": lambda shape: shape != [1024, 256],  # the MLP's down projection (its input: GELU's output)
    "no-fc1": lambda shape: shape != [256, 1024],
    "no-qkv": lambda shape: shape != [256, 768],
    "no-256": lambda shape: shape != [256, 256],  # attention output and draft-head projections
    "no-heads": lambda shape: shape[-1] != 30,  # the logit heads
}


class Feeds(CalibrationDataReader):
    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def quantised(pre: Path, nodes: list[str], calibration, out: Path) -> Path:
    cwd = os.getcwd()
    os.chdir(out.parent)  # the calibrator writes scratch files into the working directory
    try:
        quantize_static(str(pre), str(out), Feeds(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
    finally:
        os.chdir(cwd)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("fp32", type=Path)
    p.add_argument("--write", nargs=2, metavar=("GROUP", "OUT"))
    a = p.parse_args()
    src = a.fp32.resolve()
    calibration = calibration_feeds(src)
    test = calibration_feeds(src, n=64, seed=1)[:2]
    reference = ort.InferenceSession(str(src))
    expected = [reference.run(None, f)[0] for f in test]
    tmp = Path(tempfile.mkdtemp())
    pre = _preprocessed(src, str(tmp))
    proto = onnx.load(str(pre))
    shapes = {i.name: list(i.dims) for i in proto.graph.initializer}
    matmuls = [(n.name, next(shapes[x] for x in n.input if x in shapes)) for n in proto.graph.node
               if n.op_type in ("MatMul", "Gemm") and any(x in shapes for x in n.input)]
    groups = [a.write[0]] if a.write else list(GROUPS)
    for group in groups:
        nodes = [name for name, shape in matmuls if GROUPS[group](shape)]
        out = quantised(pre, nodes, calibration, tmp / f"{group}.onnx")
        got = [ort.InferenceSession(str(out)).run(None, f)[0] for f in test]
        diff = [np.abs(g - e) for g, e in zip(got, expected)]
        print(f"{group}: max |logit diff| {max(d.max() for d in diff):.3f}, mean {np.mean([d.mean() for d in diff]):.4f}")
        if a.write:
            meta = {m.key: m.value for m in onnx.load(str(src)).metadata_props}
            write_with_metadata(onnx.load(str(out)), Path(a.write[1]), meta)


if __name__ == "__main__":
    main()
