#!/usr/bin/env bash
# The GPU rows of the README's speed table for the bundled (causal) model: draft-and-verify against the same
# model's left-to-right decoder, on onnxruntime (decode files, IO binding, CUDA graphs; and without graphs)
# and in PyTorch eager, one run, with 2,000 molecules per engine written as SMILES for FCD/Test.
# Needs the gpu extra (onnxruntime-gpu) and torch on a machine with an NVIDIA GPU. Score the samples where
# the eval and fcd extras are installed: imadarem eval molecules --samples OUT/samples/cuda-*.smi
set -euo pipefail
out=${1:-bench-gpu-causal}
imadarem bench --providers cuda --batch-sizes 1,256,1024,4096 --repeats 5 --samples 2000 -o "$out"
