#!/usr/bin/env bash
# Does a learning rate chosen in the Table-3 run (bf16 weights under bf16 autocast) carry over to a plain fp32 run,
# the precision `c3a sft` uses by default? SQL, seed 0, each method at the point the SQL grid chose; compare with
# the same cells of docs/runs/table3-smollm2/sql. Run from the repository root; ../shared/data holds the data.
set -euo pipefail
D=../shared/data
OUT=docs/runs/sft-defaults-fp32
data=(--data $D/sql/train.jsonl --eval-data $D/sql/validation.jsonl)
c3a sft --model smollm2 --format sql --method c3a --lr 3 "${data[@]}" --out $OUT/sql/c3a_lr=3
c3a sft --model smollm2 --format sql --method lora --alpha 128 --lr 3e-3 "${data[@]}" --out $OUT/sql/lora_alpha=128_lr=3e-3
