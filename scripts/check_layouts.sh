#!/usr/bin/env bash
# Greedy completions of the demo model (bf16) under TP1, TP2 and TP2xPP2 through the real CLI, then a comparison.
# On GPUs this is the NCCL check of the parallel runtime; ACCELERATOR=cpu runs the same thing on gloo.
#   OUT=out ACCELERATOR=gpu PRECISION=bf16 bash scripts/check_layouts.sh
set -euo pipefail
OUT=${OUT:-out}; ACCELERATOR=${ACCELERATOR:-gpu}; PRECISION=${PRECISION:-bf16}; PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
common=(trainer.accelerator="$ACCELERATOR" trainer.precision="$PRECISION" trainer.enable_progress_bar=False
        inference.greedy=True inference.add_BOS=False inference.tokens_to_generate=64
        'prompts=["def fibonacci(n):","class Stack:","import os","for i in range(10):","    def __init__(self"]')
run() {  # name, nproc, overrides...
    local name=$1 n=$2; shift 2
    local start=$SECONDS
    "$PYTHON" -m torch.distributed.run --nproc-per-node "$n" --master-port $((29500 + RANDOM % 1000)) \
        -m nemotron.eval "${common[@]}" "$@" results_file="$OUT/$name.json" > "$OUT/$name.log" 2>&1
    echo "$name: $((SECONDS - start)) s"
}
run tp1 1
run tp2 2 tensor_model_parallel_size=2 trainer.devices=2
run tp2pp2 4 tensor_model_parallel_size=2 pipeline_model_parallel_size=2 trainer.devices=4
"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
ids = {n: json.load(open(f"{out}/{n}.json"))[0]["token_ids"] for n in ("tp1", "tp2", "tp2pp2")}
report = {}
for n in ("tp2", "tp2pp2"):
    rows = [sum(a == b for a, b in zip(x, y)) / max(len(x), len(y)) for x, y in zip(ids["tp1"], ids[n])]
    report[n] = {"identical_rows": sum(x == y for x, y in zip(ids["tp1"], ids[n])), "rows": len(rows),
                 "token_agreement": rows}
json.dump(report, open(f"{out}/layouts.json", "w"), indent=1)
print(json.dumps(report))
PY
