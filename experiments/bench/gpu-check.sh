#!/usr/bin/env bash
# One lent-GPU call for issue #26, after the calls that carry onnxruntime-gpu's parts (../shared/tools/ort-gpu-wheel)
# and install it into /tmp/gsite, and the project's wheels into /tmp/site (experiments/device/session.py's install
# does the latter). Carry runtime/models/default.onnx. Writes under $OUT:
#   cuda-tests.log   the CUDA tests (decode graphs in flight, caches in place against two buffers, token for token)
#   bench/           imadarem bench: ours against torch.compile, eager and the one-token decoder, 1 to 4,096 rows
#   inflight-LE/     whole batches against in flight at look_every LE (CudaDecoding.look_every), one process
#   ncu.csv          every kernel of one 4,096-row batch under Nsight Compute (profile_cuda.py summary reads it)
# Each step has its own time limit so that one stuck step leaves the others' files.
set -uo pipefail
export PYTHONPATH=/tmp/gsite:/tmp/site PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
out=${OUT:-/tmp/out}
mkdir -p "$out"
cp runtime/models/default.onnx /tmp/site/imadarem/runtime/models/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 300 python3 -m pytest tests -m cuda -q -rs -p no:cacheprovider 2>&1 | tee "$out/cuda-tests.log" | tail -8
timeout 300 imadarem bench --model runtime/models/default.onnx --providers cuda --batch-sizes 1,256,1024,4096 \
    --repeats 3 --samples 2000 --engines ort-decode-fp16,ort-decode-l2r-fp16,torch-compile-fp16,torch-decode-fp16 \
    -o "$out/bench" 2>&1 | grep -A14 "^| provider | batch | engine"
timeout 120 imadarem export runtime/models/default.onnx --decode --dtype fp16 -o /tmp/dv16.onnx >/dev/null
for le in 0.03125 0.125; do
    timeout 150 python3 experiments/bench/in_flight.py /tmp/dv16.onnx --provider cuda --batches 1024,4096 \
        --look-every "$le" --out "$out/inflight-$le"
done
timeout 240 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --page raw \
    --log-file "$out/ncu.csv" python3 experiments/bench/profile_cuda.py run /tmp/dv16.onnx --batch 4096 | tail -2
