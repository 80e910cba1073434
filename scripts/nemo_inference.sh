#!/usr/bin/env bash
# The Nemotron-4-340B model card's nemo_inference.sh, fixed.
#
#   bash scripts/nemo_inference.sh MODEL [call_server.py options...]
#
# Run it once per rank, as the card does (srun --ntasks-per-node=<GPUs per node>); without Slurm it is one rank.
# Every rank starts the server (`python -m nemotron.eval ... server=True`); rank 0 (SLURM_NODEID 0 and local rank 0,
# or no Slurm at all) waits until GET /health answers 200 (the card polled `curl -X PUT host:port`, which "succeeds"
# as soon as anything listens, even before the model is loaded), runs call_server.py, then stops its server with
# SIGTERM: it finishes what it is doing, and rank 0 tells every other rank to exit. No `kill -9`, no `pkill python`
# (which killed every Python process of the user on the node). Every rank waits for its server and exits with its
# status; rank 0 exits with the client's status if the client failed.
#
# Settings (environment; defaults are the card's):
#   WEB_PORT=1424  TP=8  PP=2  DEVICES=8  NUM_NODES=2  PRECISION=bf16
#   SERVER_HOST=0.0.0.0      address the server binds (the client connects to CLIENT_HOST)
#   CLIENT_HOST=127.0.0.1    where rank 0's client finds the server
#   NEMOTRON_OVERRIDES=""    more Hydra overrides for nemotron.eval, e.g. "trainer.accelerator=cpu prompts=[]"
#   PYTHON=python3           the interpreter with nemotron installed
#   CALL_SERVER=<this dir>/call_server.py
#   HEALTH_TIMEOUT=3600      seconds to wait for the model to load
# Extra arguments after MODEL go to call_server.py (e.g. --prompt "..." --tokens 64).
set -u

if [ $# -lt 1 ]; then
    echo "usage: $0 MODEL [call_server.py options...]" >&2
    exit 2
fi
NEMO_FILE=$1
shift

WEB_PORT=${WEB_PORT:-1424}
TP=${TP:-8}
PP=${PP:-2}
DEVICES=${DEVICES:-8}
NUM_NODES=${NUM_NODES:-2}
PRECISION=${PRECISION:-bf16}
SERVER_HOST=${SERVER_HOST:-0.0.0.0}
CLIENT_HOST=${CLIENT_HOST:-127.0.0.1}
PYTHON=${PYTHON:-python3}
CALL_SERVER=${CALL_SERVER:-"$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/call_server.py"}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-3600}
read -r -a OVERRIDES <<< "${NEMOTRON_OVERRIDES:-}"

node_id=${SLURM_NODEID:-0}
local_rank=${LOCAL_RANK:-${SLURM_LOCALID:-${OMPI_COMM_WORLD_LOCAL_RANK:-0}}}

# Wait until the server answers GET /health with 200, the server process dies, or HEALTH_TIMEOUT passes.
wait_for_health () {
    local url="http://$1:$2/health" waited=0
    until curl -sf -o /dev/null --max-time 5 "$url"; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "server exited before it was ready" >&2
            return 1
        fi
        if [ "$waited" -ge "$HEALTH_TIMEOUT" ]; then
            echo "server ($1:$2) not ready after ${HEALTH_TIMEOUT} s" >&2
            return 1
        fi
        if [ $((waited % 10)) -eq 0 ]; then
            echo "waiting for server ($1:$2) to be up"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "server ($1:$2) is up running"
}

"$PYTHON" -m nemotron.eval \
    gpt_model_file="$NEMO_FILE" \
    server=True \
    host="$SERVER_HOST" \
    port="$WEB_PORT" \
    tensor_model_parallel_size="$TP" \
    pipeline_model_parallel_size="$PP" \
    trainer.devices="$DEVICES" \
    trainer.num_nodes="$NUM_NODES" \
    trainer.precision="$PRECISION" \
    web_server=False \
    "${OVERRIDES[@]}" &
SERVER_PID=$!

# If this script is told to stop (scancel, Ctrl-C), stop the server the same clean way.
stop_server () {
    kill -TERM "$SERVER_PID" 2>/dev/null
}
trap stop_server TERM INT

status=0
if [ "$node_id" -eq 0 ] && [ "$local_rank" -eq 0 ]; then
    echo "SLURM_NODEID: $node_id"
    echo "local_rank: $local_rank"
    if wait_for_health "$CLIENT_HOST" "$WEB_PORT"; then
        "$PYTHON" "$CALL_SERVER" --host "$CLIENT_HOST" --port "$WEB_PORT" "$@"
        status=$?
    else
        status=1
    fi
    echo "stopping the server (pid $SERVER_PID)"
    stop_server
fi

# `wait` returns early when a trapped signal arrives; keep waiting until the server has really exited.
while true; do
    wait "$SERVER_PID"
    server_status=$?
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        break
    fi
done
if [ "$status" -eq 0 ]; then
    status=$server_status
fi
exit "$status"
