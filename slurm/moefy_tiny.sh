#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# MoEfy fine-tuning, the moefy_70b.sh template at a size that runs on 2 CPU tasks of one node
# (gloo): a tiny LLaMA with SmolLM2's vocabulary, MoEfied into 4 shells at random init, on
# State of the Union text tokenised with the shipped SmolLM2 tokenizer. It is how the SLURM
# path is tested (tests/test_slurm.py) and a smoke test for a new cluster:
#
#   sbatch slurm/moefy_tiny.sh                      # 6 iterations, checkpoint + TensorBoard
#   TRAIN_ITERS=40 EXIT_AFTER_ITERS=10 sbatch slurm/moefy_tiny.sh   # 4 requeued chunks
#   DRY_RUN=1 bash slurm/moefy_tiny.sh              # print layout, command, verdict
#
# No container by default (the host's ${PYTHON:-python}). On a GPU cluster, the same job in the
# project's image, then on 2 GPUs (NCCL) instead of the CPU:
#   CONTAINER_IMAGE=$PWD/docker/dynamoe.sqsh sbatch slurm/moefy_tiny.sh
#   CONTAINER_IMAGE=$PWD/docker/dynamoe.sqsh DEVICE=cuda sbatch --gpus-per-node=2 \
#       slurm/moefy_tiny.sh
#
#SBATCH --job-name=moefy_tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# 60 s before the time limit every task of the training step gets SIGUSR1 (no "B:": the tasks
# are signalled directly, the batch shell is not): the trainer saves after the current
# iteration and exits 0, and this script requeues the job, which resumes from the checkpoint.
#SBATCH --signal=USR1@60

set -euo pipefail

# sbatch runs a spool copy of this file ("slurm_script"): find the submitted original through
# the job record to locate the repository (or set DYNAMOE_REPO).
DYN_SCRIPT=${BASH_SOURCE[0]}
if [[ "$(basename "$DYN_SCRIPT")" == slurm_script && -n "${SLURM_JOB_ID:-}" ]]; then
  DYN_SCRIPT=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
fi
REPO=${DYNAMOE_REPO:-$(cd "$(dirname "$DYN_SCRIPT")/.." && pwd)}
DYN_SLURM_DIR=$REPO/slurm
# shellcheck source=common.sh
source "$DYN_SLURM_DIR/common.sh"

# ---- sizes (every one overridable from the environment) ------------------------------------
MODEL=${MODEL:-tiny-smollm2}
NUM_SHELLS=${NUM_SHELLS:-4}
TP=${TP:-1}
PP=${PP:-1}
VPP=${VPP:-}
EP=${EP:-2}
ETP=${ETP:-$TP}
MICRO_BATCH=${MICRO_BATCH:-2}
GLOBAL_BATCH=${GLOBAL_BATCH:-4}
SEQ_LEN=${SEQ_LEN:-64}
TRAIN_ITERS=${TRAIN_ITERS:-6}
EXIT_AFTER_ITERS=${EXIT_AFTER_ITERS:-}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
LR=${LR:-3e-3}
WARMUP_ITERS=${WARMUP_ITERS:-2}
RECOMPUTE=${RECOMPUTE:-none}
RECOMPUTE_METHOD=${RECOMPUTE_METHOD:-uniform}
RECOMPUTE_NUM_LAYERS=${RECOMPUTE_NUM_LAYERS:-1}
MEM_PER_TASK_GIB=${MEM_PER_TASK_GIB:-4}
RUN_DIR=${RUN_DIR:-$REPO/runs/moefy_tiny}
TOKENIZER=${TOKENIZER:-smollm2}               # 'smollm2' (the shipped GGUF) or an HF folder
DEVICE=${DEVICE:-cpu}                         # cpu (gloo) or cuda (NCCL, one GPU per task)
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}          # empty: no container (see the top)
DATA_PREFIX=${DATA_PREFIX:-$RUN_DIR/data/sotu_smollm2}
DATA_DOCS=${DATA_DOCS:-12}
EXTRA_ARGS=${EXTRA_ARGS:-}

dyn_resolve_allocation 1 2
if [[ -z "${SLURM_JOB_ID:-}" && "${DRY_RUN:-0}" != 1 ]]; then
  dyn_die "submit with sbatch (or DRY_RUN=1 bash $0 to see the plan)"
fi
dyn_run_paths
dyn_container_args "$DATA_PREFIX" "$TOKENIZER"
dyn_layout_flags
case "$DEVICE" in
  cpu) gpu_flags=() ;;
  cuda) gpu_flags=(--gpus-per-node="$GPUS_PER_NODE"); dyn_nccl_env ;;
  *) dyn_die "DEVICE=$DEVICE: choose cpu or cuda" ;;
esac

dyn_log "resolved: MODEL=$MODEL NODES=$NODES x $GPUS_PER_NODE tasks ($NUM_RANKS ranks)" \
        "TP=$TP PP=$PP VPP=${VPP:-off} EP=$EP ETP=$ETP shells=$NUM_SHELLS micro=$MICRO_BATCH global=$GLOBAL_BATCH seq=$SEQ_LEN" \
        "iters=$TRAIN_ITERS RUN_DIR=$RUN_DIR DEVICE=$DEVICE" \
        "CONTAINER_IMAGE=${CONTAINER_IMAGE:-(none)}"
# CPU: fp32 and host memory per task; ~1 GiB of it is Python + torch + Megatron per process.
dyn_plan --model "$MODEL" --dynamoe-num-shells "$NUM_SHELLS" --nodes "$NODES" \
  --gpus-per-node "$GPUS_PER_NODE" "${DYN_LAYOUT[@]}" --global-batch-size "$GLOBAL_BATCH" \
  --seq-length "$SEQ_LEN" --gpu-memory-gib "$MEM_PER_TASK_GIB" --reserved-gib 1

start=(--model "$MODEL" --dynamoe-num-shells "$NUM_SHELLS")
before=$(dyn_latest_iteration "$SAVE_DIR")
((before > 0)) && start+=(--load "$SAVE_DIR")
# The tasks' interpreter: the image's python in the container, else the host's.
if [[ -n "$CONTAINER_IMAGE" ]]; then task_python=python; else task_python=${PYTHON:-python}; fi
# shellcheck disable=SC2206  # EXTRA_ARGS is a flag list: word splitting intended
train=("$task_python" "$REPO/launch/train.py" "${start[@]}" "${DYN_LAYOUT[@]}"
       --device "$DEVICE" --tokenizer "$TOKENIZER" --data-path "$DATA_PREFIX" --save "$SAVE_DIR"
       --save-interval "$SAVE_INTERVAL" --tensorboard-dir "$TB_DIR"
       --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LEN" --train-iters "$TRAIN_ITERS"
       --lr "$LR" --lr-warmup-iters "$WARMUP_ITERS" --log-interval 1
       --dynamoe-sensitivity-min 0.3 --dynamoe-label-fraction 0.5
       ${EXIT_AFTER_ITERS:+--exit-after-iters "$EXIT_AFTER_ITERS"} $EXTRA_ARGS)
step=(srun --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" "${gpu_flags[@]}" --cpus-per-task=1
      --kill-on-bad-exit=1 "${DYN_CONTAINER_ARGS[@]}" "${train[@]}")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  [[ -f "$DATA_PREFIX.idx" ]] || dyn_log "would tokenise the shipped corpus into $DATA_PREFIX"
  dyn_log "would run: $(dyn_quote "${step[@]}")"
  exit 0
fi

dyn_make_run_dir
dyn_claim_run_dir
dyn_snapshot "$DYN_SCRIPT" "$DYN_PLAN_REPORT"
dyn_quote "${step[@]}" >"$SNAPSHOT_DIR/command.txt"
if [[ ! -f "$DATA_PREFIX.idx" ]]; then
  dyn_log "tokenising $DATA_DOCS State of the Union speeches into $DATA_PREFIX"
  mkdir -p "$(dirname "$DATA_PREFIX")"
  dyn_python "$REPO/tools/preprocess_data.py" --input sotu --tokenizer "$TOKENIZER" \
    --limit "$DATA_DOCS" --output-prefix "$DATA_PREFIX"
fi
# gloo over loopback on one node; OMP_NUM_THREADS=1 per task (launch_env sets it when unset).
((NODES == 1)) && export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
export PYTHONUNBUFFERED=1
dyn_log "starting at checkpoint iteration $before (restart ${SLURM_RESTART_COUNT:-0})"
dyn_run_step "${step[@]}"
dyn_requeue_or_finish "$before" "$TRAIN_ITERS"
