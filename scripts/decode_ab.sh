#!/usr/bin/env bash
# Same-machine A/B of the bench-8b batch-1 decode step (docs/benchmarks.md's rounds 7 and 8): each variant is a
# copy of the package in its own folder, and every variant runs every layout in turn on the same GPUs, so only
# numbers from one call are compared. Make the folders here first; the device machine copies untracked folders.
#   git archive REV nemotron scripts | tar -x -C ab/base --exclude=nemotron/demo/model_weights
#   VARIANTS="base=ab/base new=." LAYOUTS="4 1" OUT=$OUT bash scripts/decode_ab.sh
# A layout is the TP degree (1: plain python on GPU 0). PROFILE=1 adds the per-kernel profile of the graph step;
# BATCHES (default 1) is the benchmark's --batches.
# Each run writes $OUT/<variant>_tp<N>.json and appends its log to $OUT/logs.txt; a summary goes to stdout.
set -uo pipefail
mkdir -p "${OUT:-out}"
OUT=$(cd "${OUT:-out}" && pwd)  # absolute: each run starts in its variant's folder
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
ROOT=$PWD
SITE=${PYTHONPATH:-}  # wheels installed elsewhere (e.g. /tmp/site) stay importable
for layout in ${LAYOUTS:-1}; do
    for v in ${VARIANTS:-new=.}; do
        name=${v%%=*}
        dir=$(cd "${v#*=}" && pwd)
        args=(scripts/benchmark.py --suite decode --preset bench-8b --batches "${BATCHES:-1}" --allreduce peer
              --out "$OUT/${name}_tp$layout.json")
        [ "${PROFILE:-0}" = 1 ] && args+=(--profile 1)
        [ "$layout" != 1 ] && args+=(--tp "$layout")
        start=$SECONDS
        cd "$dir" || exit 1
        if [ "$layout" = 1 ]; then
            CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$SITE:$dir" timeout 150 python3 "${args[@]}" > "$OUT/run.log" 2>&1
        else
            PYTHONPATH="$SITE:$dir" timeout 170 python3 -m torch.distributed.run --nproc-per-node "$layout" \
                --master-port $((29500 + RANDOM % 1000)) "${args[@]}" > "$OUT/run.log" 2>&1
        fi
        rc=$?
        cd "$ROOT"
        echo "== $name tp$layout: rc $rc in $((SECONDS - start)) s"
        grep -E "greedy tokens|decode \{|profile batch|FAILED" "$OUT/run.log" | cut -c1-300
        { echo "==== $name tp$layout"; cat "$OUT/run.log"; } >> "$OUT/logs.txt"
        rm -f "$OUT/run.log"
    done
done
