#!/usr/bin/env bash
# The Table-3 run (docs/results.md, "Table 3 at small scale"): one sft-suite per dataset, in this order, then the
# report over all three. Resumable: rerun it and finished cells are skipped (their settings checked).
# --extend-edges 4: a learning-rate choice on its grid's edge is followed past it until it lies inside, up to 4
# steps, the same for every row (raised from the default 2 after C³A's choice sat on the second step on SQL and ViGGO).
# Run from the repository root with the project's environment active; ../shared/data holds the data.
set -euo pipefail
D=../shared/data
OUT=docs/runs/table3-smollm2
common=(--model smollm2 --methods none lora:alpha=32,64,128 c3a --seeds 0 1 --select-seeds 0 --bf16 --extend-edges 4 --out "$OUT"
        --task-options sql:data=$D/sql/train.jsonl:eval-data=$D/sql/validation.jsonl
                       viggo:data=$D/viggo/train.jsonl:eval-data=$D/viggo/validation.jsonl
                       gsm8k:data=$D/gsm8k/train.jsonl:max-train-samples=1000)
for task in sql viggo gsm8k; do
  c3a sft-suite --tasks "$task" "${common[@]}" || echo "sft-suite $task: some cells failed (rerun to retry them)"
done
c3a sft-suite --tasks sql viggo gsm8k "${common[@]}" --report-only
