#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# MoEfy fine-tuning of a LLaMA-2-70B / LLaMA-3-70B-class model on 8 nodes x 8 GPUs.
#
# Input: the DynaMoE checkpoint that slurm/convert_70b.sh writes (HF -> Megatron -> DynaMoE),
# $CKPT_ROOT/$MODEL-dynamoe, and a dataset tokenised with the model's tokenizer:
#
#   python tools/preprocess_data.py --input corpus.jsonl --tokenizer $HF_MODEL \
#       --output-prefix data/corpus_llama2
#   MODEL=llama2-70b HF_MODEL=/models/Llama-2-70b-hf sbatch slurm/convert_70b.sh
#   MODEL=llama2-70b HF_MODEL=/models/Llama-2-70b-hf DATA_PATH=data/corpus_llama2 \
#       sbatch slurm/moefy_70b.sh
#   DRY_RUN=1 bash slurm/moefy_70b.sh        # resolved layout, command, planner verdict
#
# Every size is an environment variable (defaults in slurm/common.sh: dyn_defaults_70b):
# TP PP VPP EP ETP NUM_SHELLS MICRO_BATCH GLOBAL_BATCH SEQ_LEN RECOMPUTE, GPU_TYPE=h100|h200
# (or GPU_MEMORY_GIB), and TRAIN_ITERS LR MIN_LR WARMUP_ITERS SAVE_INTERVAL SENS_MIN SENS_MAX
# LABEL_FRACTION DIST_TIMEOUT_MINUTES TRANSFORMER_IMPL ATTENTION_BACKEND KEEP_LAST_N
# ASYNC_SAVE DISTILL_TEACHER; more nodes: sbatch --nodes=16. The
# layout planner (tools/plan_layout.py) runs first and a layout that does not divide or does
# not fit GPU_MEMORY_GIB ends the job before srun, printing one that fits. Outputs in RUN_DIR
# (default runs/moefy_70b-$MODEL): checkpoints/ (torch_dist, --save == --load, so a requeued or
# resubmitted job resumes), tensorboard/, snapshots/ (this script, git revision + diff,
# environment, job record, planner report, per (re)start).
# Container (pyxis/enroot): every step runs in CONTAINER_IMAGE, by default
# $REPO/docker/dynamoe.sqsh (build it: docker/README.md); the repository, RUN_DIR, the
# checkpoint, tokenizer and data folders are mounted at their paths (more: CONTAINER_MOUNTS=
# /a:/a,/b:/b). CONTAINER_IMAGE= (empty) runs in the host's python environment instead.
#
#SBATCH --job-name=moefy_70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# Preemption-safe: 600 s before the time limit (SLURM may send it up to 60 s earlier) every
# training task gets SIGUSR1. Without "B:" the tasks themselves are signalled (with B: only
# this shell would be, and would have to forward it). The trainer finishes the iteration,
# writes a checkpoint and exits 0; this script then requeues the job, and it resumes. 600 s
# covers one iteration plus a ~1 TB torch_dist save of weights + optimizer state. On
# preemption SLURM sends SIGTERM, handled the same way (set GraceTime >= 600 s; with
# SlurmctldParameters=preempt_send_user_signal SIGUSR1 comes first).
#SBATCH --signal=USR1@600

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

dyn_defaults_70b
TOKENIZER=${TOKENIZER:-$HF_MODEL}
DATA_PATH=${DATA_PATH:-}                       # "PREFIX" or a blend "0.7 PREFIX1 0.3 PREFIX2"
TRAIN_ITERS=${TRAIN_ITERS:-2000}
LR=${LR:-1e-5}
MIN_LR=${MIN_LR:-1e-6}
WARMUP_ITERS=${WARMUP_ITERS:-50}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
SENS_MIN=${SENS_MIN:-0.3}                      # sensitivities sampled per iteration
SENS_MAX=${SENS_MAX:-1.0}
LABEL_FRACTION=${LABEL_FRACTION:-0.25}         # iterations that compute difficulty labels
EXIT_AFTER_ITERS=${EXIT_AFTER_ITERS:-}
ATTENTION_BACKEND=${ATTENTION_BACKEND:-sdpa}   # sdpa (flash kernels) | local (s x s scores)
KEEP_LAST_N=${KEEP_LAST_N:-3}                  # checkpoints kept (~1 TB each); older deleted
ASYNC_SAVE=${ASYNC_SAVE:-0}                    # 1: write checkpoints in the background
DISTILL_TEACHER=${DISTILL_TEACHER:-}           # the dense checkpoint to distil from (optional)
# Collective timeout: a ~1 TB checkpoint save or load on a busy file system can keep ranks
# waiting at a barrier well past Megatron's 10-minute default.
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}
RUN_DIR=${RUN_DIR:-$REPO/runs/moefy_70b-$MODEL}
CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-8}}
EXTRA_ARGS=${EXTRA_ARGS:-}
DRY_RUN=${DRY_RUN:-0}

dyn_resolve_allocation 8 8
if [[ -z "${SLURM_JOB_ID:-}" && "$DRY_RUN" != 1 ]]; then
  dyn_die "submit with sbatch (or DRY_RUN=1 bash $0 to see the plan)"
fi
dyn_run_paths
# shellcheck disable=SC2086  # DATA_PATH: a prefix or a blend "0.7 PREFIX1 0.3 PREFIX2"
dyn_container_args "$DYNAMOE_CKPT" "$TOKENIZER" $DATA_PATH
if metadata=$(dyn_checkpoint_metadata "$DYNAMOE_CKPT"); then  # its shell count is the truth
  NUM_SHELLS=$(dyn_python -c 'import json, sys
print(json.load(open(sys.argv[1]))["dynamoe"]["num_shells"])' "$metadata")
fi
dyn_nccl_env
dyn_layout_flags

dyn_log "resolved: MODEL=$MODEL NODES=$NODES GPUS_PER_NODE=$GPUS_PER_NODE ($NUM_RANKS ranks)" \
        "TP=$TP PP=$PP VPP=${VPP:-off} EP=$EP ETP=$ETP NUM_SHELLS=$NUM_SHELLS" \
        "MICRO_BATCH=$MICRO_BATCH GLOBAL_BATCH=$GLOBAL_BATCH SEQ_LEN=$SEQ_LEN" \
        "RECOMPUTE=$RECOMPUTE GPU_MEMORY_GIB=$GPU_MEMORY_GIB RUN_DIR=$RUN_DIR" \
        "CONTAINER_IMAGE=${CONTAINER_IMAGE:-(none)}"
plan_args=(--model "$MODEL" --dynamoe-num-shells "$NUM_SHELLS" --nodes "$NODES"
           --gpus-per-node "$GPUS_PER_NODE" "${DYN_LAYOUT[@]}"
           --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LEN" --bf16
           --gpu-memory-gib "$GPU_MEMORY_GIB")
plan_args+=(--attention-backend "$ATTENTION_BACKEND")
[[ -n "$DISTILL_TEACHER" ]] && plan_args+=(--distill)
dyn_plan "${plan_args[@]}"

if [[ "$DRY_RUN" == 1 ]]; then   # show where the missing inputs go
  DATA_PATH=${DATA_PATH:-'<DATA_PATH>'} TOKENIZER=${TOKENIZER:-'<HF_MODEL>'}
fi
start=(--pretrained-checkpoint "$DYNAMOE_CKPT")
before=$(dyn_latest_iteration "$SAVE_DIR")
((before > 0)) && start+=(--load "$SAVE_DIR")
async_save=()
((ASYNC_SAVE)) && async_save=(--async-save)
# The tasks' interpreter: the image's python in the container, else the host's.
if [[ -n "$CONTAINER_IMAGE" ]]; then task_python=python; else task_python=${PYTHON:-python}; fi
# shellcheck disable=SC2206  # DATA_PATH (a blend) and EXTRA_ARGS are word lists
train=("$task_python" "$REPO/launch/train.py" "${start[@]}" "${DYN_LAYOUT[@]}"
       --device cuda --transformer-impl "$TRANSFORMER_IMPL"
       --distributed-timeout-minutes "$DIST_TIMEOUT_MINUTES"
       --tokenizer "$TOKENIZER" --data-path $DATA_PATH --save "$SAVE_DIR"
       --save-interval "$SAVE_INTERVAL" --keep-last-n "$KEEP_LAST_N"
       "${async_save[@]}"
       --attention-backend "$ATTENTION_BACKEND" --tensorboard-dir "$TB_DIR" --bf16
       --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LEN" --train-iters "$TRAIN_ITERS"
       --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP_ITERS" --lr-decay-style cosine
       --weight-decay 0.1 --clip-grad 1.0 --log-interval 1
       --dynamoe-sensitivity-min "$SENS_MIN" --dynamoe-sensitivity-max "$SENS_MAX"
       --dynamoe-label-fraction "$LABEL_FRACTION"
       ${DISTILL_TEACHER:+--dynamoe-distill-teacher "$DISTILL_TEACHER"}
       ${EXIT_AFTER_ITERS:+--exit-after-iters "$EXIT_AFTER_ITERS"} $EXTRA_ARGS)
# One task per GPU; every task sees the node's GPUs (--gpus-per-node, not --gpus-per-task)
# and takes cuda:(LOCAL_RANK % device count). --gpus-per-node explicitly, so the step's GPUs
# never depend on what srun reads from the job's environment; --cpus-per-task explicitly:
# srun does not take it from sbatch on every SLURM version, and one core per rank starves the
# host side of the step. --kill-on-bad-exit: one failed rank ends the step instead of leaving
# the others blocked in a collective until the NCCL timeout.
step=(srun --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE"
      --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 "${DYN_CONTAINER_ARGS[@]}"
      "${train[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
  [[ -d "$DYNAMOE_CKPT" ]] || dyn_log "note: $DYNAMOE_CKPT does not exist yet (slurm/convert_70b.sh)"
  [[ "$DATA_PATH" != '<DATA_PATH>' ]] || dyn_log "note: set DATA_PATH (tools/preprocess_data.py output)"
  dyn_log "would run: $(dyn_quote "${step[@]}")"
  exit 0
fi
((before > 0)) || [[ -d "$DYNAMOE_CKPT" ]] ||
  dyn_die "$DYNAMOE_CKPT does not exist: run slurm/convert_70b.sh first (or set DYNAMOE_CKPT)"
[[ -n "$DATA_PATH" ]] ||
  dyn_die "DATA_PATH is not set: tokenise your data with tools/preprocess_data.py --tokenizer \$HF_MODEL"
[[ -n "$TOKENIZER" ]] || dyn_die "set HF_MODEL (or TOKENIZER): the folder with the model's tokenizer"

dyn_make_run_dir
dyn_claim_run_dir
dyn_snapshot "$DYN_SCRIPT" "$DYN_PLAN_REPORT"
dyn_quote "${step[@]}" >"$SNAPSHOT_DIR/command.txt"
export PYTHONUNBUFFERED=1
dyn_log "starting at checkpoint iteration $before (restart ${SLURM_RESTART_COUNT:-0})"
dyn_run_step "${step[@]}"
dyn_requeue_or_finish "$before" "$TRAIN_ITERS"
