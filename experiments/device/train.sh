#!/usr/bin/env bash
# Train on the lent GPU in resumable chunks (experiments/README.md, "Training on the lent GPU").
#
#   bash experiments/device/train.sh RUN_NAME TIME_LIMIT_S [imadarem train flags for a new run...]
#
# Carry `.whl` (the project's wheel and selfies, pluggy, click, tqdm) and `.devdata` (train.csv.gz and,
# to skip 2.5 minutes of encoding, the compact encoded cache in .devdata/encoded/). The run folder lives in
# /tmp/runs/RUN_NAME on the device (the repository copy loses ignored folders between calls); the first call
# starts it with the flags given, later calls (same machine, within 30 s) resume it. At the end of every call
# the log and the newest checkpoint's state and weights (in 15 MiB parts) are copied to $OUT.
set -euo pipefail
name=$1; limit=$2; shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 IMADAREM_CACHE=/tmp/imcache
mkdir -p /tmp/imcache/encoded /tmp/runs
cp -n .devdata/encoded/*.npz /tmp/imcache/encoded/ 2>/dev/null || true
run=/tmp/runs/$name
if [ -f "$run/latest" ]; then
  python3 -m imadarem.training --resume --out-dir "$run" --time-limit "$limit" --no-progress
else
  python3 -m imadarem.training --data .devdata/train.csv.gz --out-dir "$run" --time-limit "$limit" --no-progress "$@"
fi
ckpt=$run/checkpoints/$(cat "$run/latest")
cp "$run/log.jsonl" "$run/run.json" "$ckpt/state.json" "$OUT/"
split -b 15M "$ckpt/model.safetensors" "$OUT/model.safetensors.part-"
sha256sum "$ckpt/model.safetensors" > "$OUT/model.sha256"
tail -n 2 "$run/log.jsonl"
