#!/usr/bin/env bash
# The GPU table of the README: the default model's step on one GPU, every engine side by side.
# Needs the gpu and bench extras (onnxruntime-gpu, x-transformers) on a machine with an NVIDIA GPU.
# MODEL defaults to the bundled int8 file, from which bench rebuilds the float weights and exports
# the fp32 (and fp16) step with the cond_rows input, so the loop's state stays on the GPU;
# ort-fp16-head is the fp16 file with the sampling head (what `imadarem export --fp16` writes).
set -euo pipefail
out=${1:-bench-gpu}
model=${2:-}
imadarem bench ${model:+--model "$model"} --providers cuda \
  --engines ort-fp32,ort-fp16,ort-fp16-head,torch,torch-bf16,xt-nar,xt-ar-kv \
  --batch-sizes 1,64,256,1024,4096 --repeats 5 --agreement-n 512 -o "$out"
