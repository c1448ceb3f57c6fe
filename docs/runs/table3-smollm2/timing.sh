#!/usr/bin/env bash
# Training time of Table 3's two methods on a quiet machine (the grid's cells shared the two cores with other work,
# so their train_seconds are no speed comparison): per dataset, `c3a sft` with the registry's causal-LM settings
# (LoRA r=32 with dropout 0.05; C³A `auto` within LoRA r=16's parameters, b 18/12) in bf16, the first STEPS optimizer
# steps of the same batches (seed 0), the two methods alternating, ROUNDS times; then the median step times (each
# run's `step_seconds`) in timing/table.md.
# Speed does not depend on the learning rate or alpha, so the registry's are used. Resumable: finished runs are kept.
set -euo pipefail
D=../shared/data
OUT=${OUT:-docs/runs/table3-smollm2/timing}
STEPS=${STEPS:-25}
ROUNDS=${ROUNDS:-3}
declare -A DATA=(
  [sql]="--data $D/sql/train.jsonl --eval-data $D/sql/validation.jsonl"
  [viggo]="--data $D/viggo/train.jsonl --eval-data $D/viggo/validation.jsonl"
  [gsm8k]="--data $D/gsm8k/train.jsonl --max-train-samples 1000"
)
for round in $(seq 1 "$ROUNDS"); do
  for task in sql viggo gsm8k; do
    for method in lora c3a; do
      run=$OUT/$task/$method/round$round
      [ -f "$run/results.json" ] && continue
      # shellcheck disable=SC2086  # DATA's entries are flag lists
      c3a sft --model smollm2 --format "$task" --method "$method" ${DATA[$task]} --bf16 --max-steps "$STEPS" \
        --validation-samples 8 --eval-samples 8 --max-new-tokens 1 --seed 0 --out "$run"
    done
  done
done
python - "$OUT" "$STEPS" <<'PY'
import glob, json, os, statistics, sys

out, steps, warm = sys.argv[1], int(sys.argv[2]), 3
runs = {}
for path in sorted(glob.glob(os.path.join(out, "*", "*", "round*", "results.json"))):
    task, method, round_ = path.split(os.sep)[-4:-1]
    with open(path) as f:
        r = json.load(f)
    # the median step after the first `warm` ones (allocations, kernel choices for new shapes)
    runs.setdefault(task, {}).setdefault(method, {})[round_] = (statistics.median(r["step_seconds"][warm:]),
                                                                r["peak_memory_bytes"])
lines = ["| dataset | LoRA r=32 s/step | C³A s/step | C³A / LoRA (median of paired rounds) | peak RSS LoRA / C³A (GiB) | rounds |",
         "|---|---:|---:|---:|---|---:|"]
summary = {}
for task in ("sql", "viggo", "gsm8k"):
    lora, c3a = runs.get(task, {}).get("lora", {}), runs.get(task, {}).get("c3a", {})
    paired = sorted(set(lora) & set(c3a))
    if not paired:
        continue
    ratio = statistics.median(c3a[k][0] / lora[k][0] for k in paired)
    med = {m: statistics.median(v[k][0] for k in paired) for m, v in (("lora", lora), ("c3a", c3a))}
    mem = {m: max(v[k][1] for k in paired) / 2**30 for m, v in (("lora", lora), ("c3a", c3a))}
    summary[task] = {"seconds_per_step": med, "ratio": ratio, "peak_rss_gib": mem, "rounds": len(paired)}
    lines.append(f"| {task} | {med['lora']:.2f} | {med['c3a']:.2f} | {ratio:.3f} | {mem['lora']:.2f} / {mem['c3a']:.2f} | {len(paired)} |")
text = (f"## Table 3: training time on a quiet machine\n\nFirst {steps} optimizer steps of each dataset's batches "
        f"(batch 8, bf16, seed 0), `c3a sft` per run, the methods alternating; seconds per step = the median of the "
        f"run's `step_seconds` after its first {warm} (validation, loading and scoring outside); memory: peak RSS "
        "of the run's process.\n\n" + "\n".join(lines) + "\n")
with open(os.path.join(out, "table.md.tmp"), "w") as f:
    f.write(text)
os.replace(os.path.join(out, "table.md.tmp"), os.path.join(out, "table.md"))
with open(os.path.join(out, "summary.json.tmp"), "w") as f:
    json.dump(summary, f, indent=2)
os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
print(text)
PY
