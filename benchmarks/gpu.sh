#!/usr/bin/env bash
# The GPU check of docs/performance.md, in one go (about 3 minutes on one H200 before the compiled step and the
# serving bench were added; budget: under 8): a 2-layer Llama-3-8B-shaped bf16 training step, eager and compiled,
# and the operator grid; the same step with fp32 weights under bf16 autocast; where the DFT-as-GEMM path stops
# paying; serving mixed batches with 1/8/64 adapters; and the per-kernel profile (with launch counts) of one layer.
# Every C³A path is checked against float64 first.
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
c3a bench --model llama3-8b --layers 2 --device cuda --dtype bfloat16 --serve 1,8,64 \
  --serve-methods frozen,lora:8,lora:32,c3a:128 --serve-batch 64 --seq 256 --rounds 5 --warmup 2 --out "$out/serve"
python3 "$(dirname "$0")/profile_layer.py" | tee "$out/profile-layer.txt"
