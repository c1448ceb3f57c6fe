#!/usr/bin/env bash
# The GPU check of docs/performance.md, in one go: a 2-layer Llama-3-8B-shaped bf16 training step, eager and
# compiled, and the operator grid; the same step with fp32 weights under bf16 autocast; where the DFT-as-GEMM path
# stops paying; the per-kernel profile (with launch counts) of one layer; last, serving mixed batches with 1/8/64
# adapters. Every C³A path is checked against float64 first.
# Time on one H200 (docs/runs/bench-gpu-h200: gpu.log, serve.log): the first three steps finished inside 420 s;
# serving is host-bound (one short decode step per token) and took 69 s for its first adapter
# count at these settings, so it is last: a run cut at a 10-minute slot loses only it.
# Usage: benchmarks/gpu.sh [OUT_DIR]   (default: bench-gpu)
set -euo pipefail
out=${1:-bench-gpu}
c3a bench --model llama3-8b --layers 2 --device cuda --dtype bfloat16 \
  --methods frozen,lora:32,lora-bf16:32,peft-c3a:128,c3a:128 --batch 4 --seq 2048 --rounds 10 --warmup 3 --compile \
  --operator --op-shapes 4096x4096,4096x1024 --op-blocks 128,256 --op-tokens 8192,16384 --op-lora-rank 32 \
  --op-reps 20 --out "$out/step-bf16"
c3a bench --model llama3-8b --layers 2 --device cuda --dtype float32 --autocast \
  --methods frozen,lora:32,peft-c3a:128,c3a:128 --batch 4 --seq 2048 --rounds 10 --warmup 3 --out "$out/step-autocast"
c3a bench --methods "" --device cuda --operator --dtype bfloat16 --op-shapes 4096x4096 --op-blocks 256,512,1024,2048 \
  --op-tokens 16384 --op-lora-rank 32 --op-reps 20 --out "$out/dft-threshold"
python3 "$(dirname "$0")/profile_layer.py" | tee "$out/profile-layer.txt"
c3a bench --model llama3-8b --layers 2 --device cuda --dtype bfloat16 --serve 1,8,64 \
  --serve-methods frozen,lora:8,lora:32,c3a:128 --serve-batch 64 --seq 256 --rounds 2 --warmup 1 --out "$out/serve"
