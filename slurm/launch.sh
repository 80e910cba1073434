#!/bin/bash
# Serve a Nemotron-4 checkpoint on a Slurm cluster: the model card's sbatch script (step 3), made ours.
#
#   MODEL=/lustre/models/Nemotron-4-340B-Base IMAGE=/lustre/images/nemotron.sqsh sbatch slurm/launch.sh
#   MODE=bare PYTHON=/shared/venvs/nemotron/bin/python MODEL=/lustre/models/Nemotron-4-340B-Base sbatch slurm/launch.sh
#
# One task per GPU (2 nodes x 8 by default), every task runs `python -m nemotron.eval ... server=True` with
# TP=8 x PP=2, exactly the card's megatron_gpt_eval.py command line. Rank 0 (first node, first task) serves
# PUT /generate on PORT; the others follow it. Ranks, world size and local ranks come from Slurm's variables
# (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID) through nemotron's runtime; this script only exports
# MASTER_ADDR (the first node of the job) and MASTER_PORT. With RUN_CLIENT=1 it does what the card's
# nemo_inference.sh did: rank 0 waits for the server, runs scripts/call_server.py, stops the server, and the job
# ends (exit status 0 when everything worked). Otherwise the job keeps serving until scancel or its time limit.
#
# The #SBATCH lines below are defaults: options given to sbatch on its command line win, e.g. for a CPU test
#   sbatch --ntasks-per-node=2 --gpus-per-node=0 slurm/launch.sh   (with TP=2 PP=2 ACCELERATOR=cpu PRECISION=32).
#SBATCH -N 2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH -J nemotron
# Remove one '#' to set your account and partition (or pass -A/-p to sbatch):
##SBATCH -A SLURM-ACCOUNT
##SBATCH -p SLURM-PARTITION
##SBATCH -t 04:00:00

set -euo pipefail

# ------------------------------------------------------------------------------------------------------------------
# Settings. Every one of them can be set in the environment of `sbatch` (sbatch exports it to the job); the value
# after ':-' is the default (after '-' where an empty value means "none").
# ------------------------------------------------------------------------------------------------------------------

# The checkpoint: a .nemo file, an unpacked NeMo directory (model_config.yaml + model_weights/) or a Hugging Face
# NemotronForCausalLM directory. A path on the nodes (bare mode) or on the host, mounted into the container.
MODEL=${MODEL:-}
# container: run every task in IMAGE through pyxis/enroot (srun --container-image), as the card does.
# bare:      run every task with PYTHON, an interpreter on the nodes where nemotron is installed (shared venv).
MODE=${MODE:-container}
# container: the image built from our Dockerfile, as pyxis takes it: a squashfs file (enroot import
# dockerd://nemotron:latest) or a registry URI such as registry.example.com#team/nemotron:0.1.0.
IMAGE=${IMAGE:-}
# container: where MODEL appears inside the container.
CONTAINER_MODEL=${CONTAINER_MODEL:-/model}
# container: --container-mounts. Default: the checkpoint, read-only. Set it to add more (then include the model
# mount yourself, e.g. MOUNTS=/lustre/models/Nemotron-4-340B-Base:/model:ro,/lustre/scratch:/scratch).
MOUNTS=${MOUNTS:-${MODEL}:${CONTAINER_MODEL}:ro}
# container: more pyxis options. The image's entry point is `python -m nemotron.eval`; the tasks run their own
# command, so the entry point is skipped (set CONTAINER_OPTS="" for a pyxis that does not know this option).
CONTAINER_OPTS=${CONTAINER_OPTS---no-container-entrypoint}
# The Python interpreter of the tasks. Default: `python` inside the container, `python3` on bare metal
# (set it to your venv's python, e.g. /shared/venvs/nemotron/bin/python).
if [ "$MODE" = container ]; then
    PYTHON=${PYTHON:-python}
else
    PYTHON=${PYTHON:-python3}
fi
# Model parallelism (NeMo's tensor_model_parallel_size / pipeline_model_parallel_size). TP x PP must equal
# DEVICES x NUM_NODES, the number of tasks.
TP=${TP:-8}
PP=${PP:-2}
# Tasks (GPUs) per node = trainer.devices. GPUS_PER_NODE is accepted as another name for it. Default: the job's
# --ntasks-per-node.
DEVICES=${DEVICES:-${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}}
# Nodes = trainer.num_nodes. Default: the job's node count.
NUM_NODES=${NUM_NODES:-${SLURM_JOB_NUM_NODES:-2}}
# HTTP server: rank 0 listens on HOST:PORT (1424 as in the card; 0.0.0.0 = every address of the first node).
PORT=${PORT:-1424}
HOST=${HOST:-0.0.0.0}
# trainer.precision (bf16, 16, 32, ...) and trainer.accelerator (gpu; cpu for tests without GPUs).
PRECISION=${PRECISION:-bf16}
ACCELERATOR=${ACCELERATOR:-gpu}
# More Hydra overrides for nemotron.eval, separated by spaces (no spaces inside one), e.g.
# EXTRA_OVERRIDES="prompts=[] inference.max_batch_size=64 server_api_key=secret".
EXTRA_OVERRIDES=${EXTRA_OVERRIDES:-}
# 1: the card's flow. Rank 0 waits until GET /health answers (at most HEALTH_TIMEOUT seconds, default 3600), runs
# scripts/call_server.py with CLIENT_ARGS (shell quoting allowed, e.g. CLIENT_ARGS='--prompt "Hello" --tokens 64';
# none: the card's request), then stops the server with SIGTERM; every rank exits and the job ends.
# 0: serve until the job is cancelled.
RUN_CLIENT=${RUN_CLIENT:-0}
CLIENT_ARGS=${CLIENT_ARGS:-}
# Where the tasks' output goes: the card's pattern, one file per node (%j = job id, %n = node index; srun's
# %t = task/rank gives one file per rank). Lines are prefixed with the rank (srun --label, in SRUN_ARGS).
RESULTS=${RESULTS:-${SLURM_SUBMIT_DIR:-$PWD}/results}
OUTFILE=${OUTFILE:-${RESULTS}/slurm-%j-%n.out}
ERRFILE=${ERRFILE:-${RESULTS}/error-%j-%n.out}
# More srun options (split on spaces), e.g. SRUN_ARGS="--label --mpi=pmix".
SRUN_ARGS=${SRUN_ARGS---label}
# torch.distributed rendezvous: the first node of the job, and a port derived from the job id (so two jobs that
# share a node do not collide). The runtime also uses MASTER_PORT+1 (its heartbeat store).
# Default: MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1), MASTER_PORT=20000 + job id % 10000.
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}
# Where scripts/nemo_inference.sh and scripts/call_server.py are (RUN_CLIENT=1 only). Default: /opt/nemotron/scripts
# in the container; on bare metal the scripts/ folder next to this script's folder (found through the job's
# Command), else $SLURM_SUBMIT_DIR/scripts.
SCRIPTS_DIR=${SCRIPTS_DIR:-}

# ------------------------------------------------------------------------------------------------------------------

die () {
    echo "launch.sh: error: $*" >&2
    exit 2
}

if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ]; then
    die "not inside a Slurm job: submit this script with sbatch"
fi
[ -n "$MODEL" ] || die "set MODEL to the checkpoint (.nemo file, NeMo directory or Hugging Face directory)"
case "$MODE" in
    container)
        [ -n "$IMAGE" ] || die "MODE=container needs IMAGE (a squashfs file or registry URI of the image built from our Dockerfile); or use MODE=bare"
        TASK_MODEL=$CONTAINER_MODEL
        SCRIPTS_DIR=${SCRIPTS_DIR:-/opt/nemotron/scripts}
        ;;
    bare)
        TASK_MODEL=$MODEL
        ;;
    *)
        die "MODE must be 'container' or 'bare', not '$MODE'"
        ;;
esac
[ -e "$MODEL" ] || die "MODEL $MODEL does not exist on $(hostname)"
case "$RUN_CLIENT" in 0|1) ;; *) die "RUN_CLIENT must be 0 or 1, not '$RUN_CLIENT'" ;; esac
for name in TP PP DEVICES NUM_NODES PORT MASTER_PORT; do
    [[ ${!name} =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer, not '${!name}'"
done
if [ "$PORT" -gt 65535 ] || [ "$MASTER_PORT" -gt 65534 ]; then
    die "PORT ($PORT) or MASTER_PORT ($MASTER_PORT) out of range"
fi
if [ $((TP * PP)) -ne $((DEVICES * NUM_NODES)) ]; then
    die "TP x PP = $TP x $PP = $((TP * PP)) but DEVICES x NUM_NODES = $DEVICES x $NUM_NODES = $((DEVICES * NUM_NODES)) (one task per GPU)"
fi
if [ -n "${SLURM_JOB_NUM_NODES:-}" ] && [ "$NUM_NODES" -gt "$SLURM_JOB_NUM_NODES" ]; then
    die "NUM_NODES=$NUM_NODES but the job has $SLURM_JOB_NUM_NODES node(s) (sbatch -N)"
fi

if [ -z "$MASTER_ADDR" ]; then
    # (no `| head -n1` under pipefail: head may close the pipe while scontrol still writes, and SIGPIPE fails the job)
    job_hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || die "scontrol show hostnames failed"
    MASTER_ADDR=${job_hosts%%$'\n'*}
    [ -n "$MASTER_ADDR" ] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host name"
fi

if [ "$MODE" = bare ] && [ "$RUN_CLIENT" = 1 ] && [ -z "$SCRIPTS_DIR" ]; then
    # sbatch runs a copy of this script from its spool directory; the job's Command names the submitted file.
    job_command=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n1 || true)
    for candidate in "$job_command" "${job_command%% *}"; do
        if [ -f "$candidate" ] && [ -f "$(dirname "$candidate")/../scripts/nemo_inference.sh" ]; then
            SCRIPTS_DIR=$(cd "$(dirname "$candidate")/../scripts" && pwd)
            break
        fi
    done
    if [ -z "$SCRIPTS_DIR" ] && [ -f "${SLURM_SUBMIT_DIR:-.}/scripts/nemo_inference.sh" ]; then
        SCRIPTS_DIR=${SLURM_SUBMIT_DIR:-.}/scripts
    fi
    [ -n "$SCRIPTS_DIR" ] || die "cannot find scripts/nemo_inference.sh; set SCRIPTS_DIR"
fi

read -r -a extra_overrides <<< "$EXTRA_OVERRIDES"
read -r -a srun_extra <<< "$SRUN_ARGS"
eval "client_argv=($CLIENT_ARGS)"  # the user's own arguments, split with the shell's quoting rules

mkdir -p "$RESULTS"
export MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1

srun_argv=(srun --export=ALL --kill-on-bad-exit=1 --nodes="$NUM_NODES"
           --ntasks=$((DEVICES * NUM_NODES)) --ntasks-per-node="$DEVICES"
           -o "$OUTFILE" -e "$ERRFILE" "${srun_extra[@]}")
if [ "$MODE" = container ]; then
    read -r -a container_opts <<< "$CONTAINER_OPTS"
    srun_argv+=(--container-image="$IMAGE" --container-mounts="$MOUNTS" "${container_opts[@]}")
fi

# Under scancel (or at the time limit) Slurm sends SIGTERM to every task at once. Rank 0 then drains: it finishes the
# requests in flight, which needs the other ranks alive, and tells them to exit. So only rank 0 acts on SIGTERM; the
# others ignore it (an ignored signal stays ignored across exec) and exit on rank 0's command, or on SIGKILL after the
# cluster's KillWait. Rank 0 is SLURM_PROCID 0, as for the runtime.
# shellcheck disable=SC2016  # expanded by each task's shell, not here
term_wrapper='if [ "${SLURM_PROCID:-0}" != 0 ]; then trap "" TERM; fi; exec "$@"'

if [ "$RUN_CLIENT" = 1 ]; then
    # scripts/nemo_inference.sh (our fixed version of the card's) runs on every task: it starts the server, and on
    # rank 0 it waits for /health, runs call_server.py and stops the server cleanly. It reads these settings:
    if [ "$HOST" = 0.0.0.0 ]; then client_host=127.0.0.1; else client_host=$HOST; fi
    export WEB_PORT=$PORT TP PP DEVICES NUM_NODES PRECISION PYTHON SERVER_HOST=$HOST \
        CLIENT_HOST=${CLIENT_HOST:-$client_host} NEMOTRON_OVERRIDES="trainer.accelerator=$ACCELERATOR $EXTRA_OVERRIDES" \
        CALL_SERVER=$SCRIPTS_DIR/call_server.py
    task=(bash -c "$term_wrapper" nemotron-task bash "$SCRIPTS_DIR/nemo_inference.sh" "$TASK_MODEL" "${client_argv[@]}")
else
    task=(bash -c "$term_wrapper" nemotron-task "$PYTHON" -m nemotron.eval
          gpt_model_file="$TASK_MODEL"
          server=True
          host="$HOST"
          port="$PORT"
          tensor_model_parallel_size="$TP"
          pipeline_model_parallel_size="$PP"
          trainer.devices="$DEVICES"
          trainer.num_nodes="$NUM_NODES"
          trainer.precision="$PRECISION"
          trainer.accelerator="$ACCELERATOR"
          web_server=False
          "${extra_overrides[@]}")
fi

echo "nemotron launch: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}, mode $MODE, TP=$TP PP=$PP," \
     "$NUM_NODES node(s) x $DEVICES task(s), MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
if [ "$RUN_CLIENT" = 1 ]; then
    echo "nemotron launch: the card's flow: rank 0 runs call_server.py once the server is up, then the job ends"
else
    echo "nemotron launch: serving on $MASTER_ADDR:$PORT (PUT /generate, GET /health) until the job is cancelled"
fi
echo "nemotron launch: task output: $OUTFILE, $ERRFILE"
printf 'nemotron launch:'; printf ' %q' "${srun_argv[@]}" "${task[@]}"; echo

status=0
"${srun_argv[@]}" "${task[@]}" || status=$?
echo "nemotron launch: srun exited with status $status"
exit "$status"
