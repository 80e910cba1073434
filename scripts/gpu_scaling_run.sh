#!/usr/bin/env bash
# docs/benchmarks.md's runs on one 4-GPU host, in one go: the full single-GPU suite of bench-8b on GPU 0 (with the
# HF peer), TP2/TP4 decode (peer and NCCL all-reduces timed in the same run), the 340B-width slice on TP4 with its
# 16-GPU extrapolation, PP2 and TP2xPP2 decode (per-stage graphs), and the demo model's greedy tokens under
# TP1/TP2/TP2xPP2 through the CLI.
#   OUT=out bash scripts/gpu_scaling_run.sh        (megatron-core, hydra and flask importable for the CLI part)
# Shorter: TP1=decode (TP1 batch-1 decode only, the scaling baseline) or none, TPS=0 (no TP2/TP4), SLICE=0 (no 340B
# slice), PP2=0 (no PP2 alone), TP2PP2=0, BATCHING=1 (first, on GPU 0: the batching suite), LAYOUTS=0 (no CLI layouts).
# Each step has its own time limit, so one hang costs only its own minutes.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
B=(scripts/benchmark.py --suite decode --preset bench-8b)
run() {  # name, limit_s, processes (1: plain python on GPU 0), benchmark args...
    local name=$1 limit=$2 n=$3; shift 3
    local start=$SECONDS
    if [ "$n" = 1 ]; then
        CUDA_VISIBLE_DEVICES=0 timeout "$limit" python3 "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    else
        timeout "$limit" python3 -m torch.distributed.run --nproc-per-node "$n" \
            --master-port $((29500 + RANDOM % 1000)) "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    fi
    echo "== $name: rc $? in $((SECONDS - start)) s"
    grep -v -i "warn" "$OUT/$name.log" | grep -E "summary|^ +[0-9]|all-reduce|batch 1 with|NCCL|peer|extrapolate|teacher|batching|served|FAILED|Error" \
        | cut -c1-400 | head -30
}
if [ "${BATCHING:-0}" = 1 ]; then
    run batching 150 1 scripts/benchmark.py --suite batching --preset bench-8b --budget-s 140
fi
# TP1: the full suite on GPU 0 (roofline, correctness, HF peer, batches 1-128, prefill, profile): the baseline
if [ "${TP1:-full}" = decode ]; then
    run tp1 100 1 "${B[@]}" --batches 1
elif [ "${TP1:-full}" != none ]; then
    run tp1 230 1 scripts/benchmark.py --preset bench-8b --budget-s 200 --compile off --profile 1,64 \
        --plot "$OUT/decode_tok_s.png"
fi
if [ "${TPS:-1}" = 1 ]; then
    run tp2 120 2 "${B[@]}" --tp 2 --batches 1
    run tp4 120 4 "${B[@]}" --tp 4 --batches 1
fi
if [ "${SLICE:-1}" = 1 ]; then
    run tp4_340b 180 4 scripts/benchmark.py --suite decode --tp 4 --preset nemotron-4-340b --layers auto \
        --slope-layers 4 --batches 1,32 --extrapolate
fi
if [ "${PP2:-1}" = 1 ]; then
    run pp2 90 2 "${B[@]}" --pp 2 --batches 1
fi
if [ "${TP2PP2:-1}" = 1 ]; then
    run tp2pp2 90 4 "${B[@]}" --tp 2 --pp 2 --batches 1
fi
if [ "${LAYOUTS:-1}" = 1 ]; then
    start=$SECONDS
    OUT=$OUT/layouts ACCELERATOR=gpu PRECISION=bf16 PYTHON=python3 timeout 150 bash scripts/check_layouts.sh \
        > "$OUT/layouts.log" 2>&1
    echo "== layouts: rc $? in $((SECONDS - start)) s"; tail -3 "$OUT/layouts.log"
    grep -h -i "graph" "$OUT"/layouts/*.log | sort | uniq -c | head
fi
