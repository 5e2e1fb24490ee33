# shellcheck shell=bash disable=SC2034
# (SC2034: the globals these functions set are read by the calling scripts.)
# Shared by slurm/moefy_70b.sh, slurm/moefy_tiny.sh and slurm/convert_70b.sh (sourced, never
# run). Everything here is a function; the scripts decide the order. Conventions:
#   - every size is an environment variable with a default in the calling script;
#   - DRY_RUN=1 prints the resolved layout, the commands and the planner's verdict, launches
#     nothing and exits with the planner's status (0 fits, 2 refused);
#   - the planner runs before any srun: a refused layout ends the job before it uses the nodes.

# ---- logging -------------------------------------------------------------------------------
dyn_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
dyn_die() { dyn_log "error: $*"; exit 2; }

# Print a command array as a copy-pasteable line.
dyn_quote() { printf '%q ' "$@"; printf '\n'; }

# DYN_PYTHON: how a job runs one python process: an srun step in the container when
# CONTAINER_IMAGE is set (the host may have no Python environment), else ${PYTHON:-python} on
# the batch node. Set by dyn_container_args.
# dyn_python runs it; outside a job (a dry run on a login node) it is always the host's python.
dyn_python() {
  if [[ -n "${CONTAINER_IMAGE:-}" && -n "${SLURM_JOB_ID:-}" ]]; then
    "${DYN_PYTHON[@]}" "$@"
  else
    "${PYTHON:-python}" "$@"
  fi
}

# ---- the allocation ------------------------------------------------------------------------
# NODES / GPUS_PER_NODE: from the allocation inside a job, else the script's defaults (dry run
# on a login node). Refuses a job whose allocation disagrees with the requested sizes.
dyn_resolve_allocation() {
  local default_nodes=$1 default_gpus=$2
  NODES=${NODES:-${SLURM_JOB_NUM_NODES:-$default_nodes}}
  GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$default_gpus}}
  if [[ -n "${SLURM_JOB_NUM_NODES:-}" && "$NODES" != "$SLURM_JOB_NUM_NODES" ]]; then
    dyn_die "NODES=$NODES but the job has $SLURM_JOB_NUM_NODES nodes: submit with sbatch --nodes=$NODES"
  fi
  NUM_RANKS=$((NODES * GPUS_PER_NODE))
}

# A one-node tool job (convert_70b.sh, evaluate_70b.sh): refuse to run outside sbatch unless
# DRY_RUN=1; HF_MODEL is required ($1 says what it is for), a placeholder in a dry run.
dyn_tool_job_inputs() {
  if [[ -z "${SLURM_JOB_ID:-}" && "${DRY_RUN:-0}" != 1 ]]; then
    dyn_die "submit with sbatch (or DRY_RUN=1 bash $0 to see the plan)"
  fi
  if [[ -z "$HF_MODEL" ]]; then
    [[ "${DRY_RUN:-0}" == 1 ]] || dyn_die "set HF_MODEL to the Hugging Face folder of $MODEL ($1)"
    HF_MODEL='<HF_MODEL>'
  fi
}

# A distributed tool's TP x PP ($1 $2, named $3 and $4 in messages) must be the job's GPUs
# ($5 nodes x $6 GPUs per node): one model replica, one task per GPU.
dyn_require_gpus() {
  local ranks=$(($1 * $2))
  if ((ranks != $5 * $6)); then
    dyn_die "$3 x $4 = $ranks GPUs but the job has $5 node(s) x $6 GPUs: submit with" \
            "sbatch --nodes=$((ranks / $6))"
  fi
}

# ---- run folder ----------------------------------------------------------------------------
# RUN_DIR keeps checkpoints, TensorBoard events and one snapshot per (re)start. A fixed RUN_DIR
# is what makes a requeued or resubmitted job resume: --load and --save are both $SAVE_DIR.
# Paths only: a dry run writes nothing. dyn_make_run_dir creates them.
dyn_run_paths() {
  SAVE_DIR=$RUN_DIR/checkpoints
  TB_DIR=$RUN_DIR/tensorboard
  SNAPSHOT_DIR=$RUN_DIR/snapshots/${SLURM_JOB_ID:-local}-restart${SLURM_RESTART_COUNT:-0}
}
dyn_make_run_dir() { mkdir -p "$SAVE_DIR" "$TB_DIR" "$SNAPSHOT_DIR"; }

# Two live jobs writing one checkpoint folder corrupt each other's runs: refuse the second.
dyn_claim_run_dir() {
  [[ -n "${SLURM_JOB_ID:-}" ]] || return 0
  local owner_file=$RUN_DIR/.owner_job owner state
  if [[ -f "$owner_file" ]]; then
    owner=$(<"$owner_file")
    if [[ "$owner" != "$SLURM_JOB_ID" ]]; then
      state=$(squeue --noheader --jobs "$owner" --format=%T 2>/dev/null || true)
      if [[ "$state" == RUNNING || "$state" == COMPLETING ]]; then
        dyn_die "job $owner is already training in $RUN_DIR: wait for it, or set RUN_DIR"
      fi
    fi
  fi
  printf '%s\n' "$SLURM_JOB_ID" >"$owner_file"
}

# Run megatron_dynamoe/runtime/redaction.py (standard library only, run as a file: neither the
# package's imports nor the container are needed) with "$@" on the batch node: the job's
# ${PYTHON:-python}, else python3 (a container site's host may have only that). Fails, having
# read no input, when no interpreter here can run it.
dyn_redact() {
  local py tool=$DYN_SLURM_DIR/../megatron_dynamoe/runtime/redaction.py
  for py in "${PYTHON:-python}" python3; do
    if "$py" -I -S "$tool" check >/dev/null 2>&1; then
      "$py" -I -S "$tool" "$@"
      return
    fi
  done
  return 1
}

# What ran: the batch script, the git revision (+ the uncommitted diff), the environment, the
# job record. Secrets are redacted in env.txt, git.diff and the script copy (slurm/README.md
# says what), and the folder is the owner's only (0700, files 0600: umask 077 in this
# subshell). Read-only for git (--no-optional-locks: no index refresh).
dyn_snapshot() (
  umask 077
  local script=$1 d=$SNAPSHOT_DIR plan_report=$2 redact=1
  dyn_redact check || redact=0
  chmod 700 "$d"
  printf '%s\n' "$plan_report" >"$d/plan.txt"
  # A batch script may export a token inline: its copy is redacted too.
  if ((redact)); then dyn_redact text <"$script" >"$d/${script##*/}"; else cp "$script" "$d/"; fi
  cp "$DYN_SLURM_DIR/common.sh" "$d/"
  if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    local rev dirty=clean
    rev=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "no commit")
    if [[ -n "$(git --no-optional-locks -C "$REPO" status --porcelain --untracked-files=no)" ]]; then
      dirty=dirty
      if ((redact)); then
        git --no-optional-locks -C "$REPO" diff HEAD 2>/dev/null | dyn_redact text >"$d/git.diff" \
          || true
      else  # nothing to redact with: the changed files and line counts, no content
        git --no-optional-locks -C "$REPO" diff --stat HEAD >"$d/git.diff" 2>/dev/null || true
      fi
    fi
    printf '%s %s\n' "$rev" "$dirty" >"$d/git.txt"
  else
    printf 'not a git checkout: %s\n' "$REPO" >"$d/git.txt"
  fi
  # The environment exactly as this shell exports it (`env -0`: a multi-line value is one
  # record, not several lines of `env`); without redaction, the names only.
  if ! ((redact)) || ! env -0 | dyn_redact env-nul >"$d/env.txt" 2>/dev/null; then
    compgen -e | LC_ALL=C sort | sed 's/$/=<redacted>/' >"$d/env.txt"
  fi
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    scontrol show job "$SLURM_JOB_ID" >"$d/job.txt" 2>&1 || true
  fi
  ((redact)) || dyn_log "note: neither ${PYTHON:-python} nor python3 runs here: env.txt lists" \
                        "names only, git.diff the changed files only"
  dyn_log "snapshot of script, git revision, environment and job in $d"
)

# ---- GPU communication ---------------------------------------------------------------------
dyn_nccl_env() {
  # Megatron needs one hardware queue so TP/SP communication kernels launch in issue order and
  # overlap with compute as scheduled.
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  # A failed or hung collective raises on every rank (the job dies and requeues) instead of
  # hanging until the time limit; the flight recorder dumps what each rank was doing.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
  export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
  export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$RUN_DIR/nccl_trace_rank_}
  # Caching-allocator-friendly NCCL (Megatron's recommendation: less fragmentation).
  export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
  # InfiniBand: tolerate fabric hiccups at 64+ GPUs (timeout 4.096 us * 2^22 ~ 17 s, retries).
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
  export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-10}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # Interfaces and HCAs (NCCL_SOCKET_IFNAME=ib0, NCCL_IB_HCA=mlx5, ...) are site-specific:
  # they come from the submitting environment (sbatch exports it), never guessed here, since a
  # wrong guess is worse than NCCL's own detection.
}

# ---- container (pyxis) ---------------------------------------------------------------------
# CONTAINER_IMAGE: the image every srun step runs in (pyxis/enroot), normally the squashfs file
# built from docker/Dockerfile (docker/README.md); empty: no container, the steps run in the
# host's ${PYTHON:-python} environment (a venv made with `make install`).
# DYN_CONTAINER_ARGS: the pyxis flags (empty without a container):
#   --container-name=${DYNAMOE_CONTAINER_NAME:-dynamoe}: pyxis unpacks the image once per
#     node and job and the later steps reuse it (a (re)start runs up to three: NUM_SHELLS,
#     planner, training; without a name each would import the image again);
#   --container-mounts: the repository and the run folder, plus the absolute paths given as
#     arguments (checkpoints, model, data: each path, or its parent folder when it is not a
#     folder yet), each at the same path, so commands are identical inside and outside the
#     container; more with CONTAINER_MOUNTS=/a:/a,/b:/b;
#   --container-workdir: the repository.
# A .sqsh path that does not exist ends a job here (a dry run only notes it).
dyn_container_args() {
  DYN_CONTAINER_ARGS=()
  DYN_PYTHON=("${PYTHON:-python}")
  [[ -n "${CONTAINER_IMAGE:-}" ]] || return 0
  case "$CONTAINER_IMAGE" in
    *.sqsh | *.squashfs | /* | ./*)
      if [[ ! -f "$CONTAINER_IMAGE" ]]; then
        local hint="build it (docker/README.md), or set CONTAINER_IMAGE= to run without a container"
        if [[ "${DRY_RUN:-0}" == 1 ]]; then
          dyn_log "note: CONTAINER_IMAGE=$CONTAINER_IMAGE does not exist yet: $hint"
        else
          dyn_die "CONTAINER_IMAGE=$CONTAINER_IMAGE does not exist: $hint"
        fi
      fi ;;
    *) dyn_log "note: CONTAINER_IMAGE=$CONTAINER_IMAGE is pulled from a registry on every node;" \
               "a .sqsh file on a shared file system starts faster (docker/README.md)" ;;
  esac
  local dirs=() path dir other covered mounts=""
  for path in "$REPO" "$RUN_DIR" "$@"; do
    [[ "$path" == /* ]] || continue              # names ('smollm2'), placeholders, weights
    dir=$path
    [[ -d "$dir" ]] || dir=$(dirname "$dir")
    if [[ "$dir" != / ]]; then dirs+=("$dir"); fi
  done
  for dir in "${dirs[@]}"; do                    # each folder once, none inside another
    covered=0
    for other in "${dirs[@]}"; do
      if [[ "$dir" == "$other"/* ]]; then covered=1; break; fi
    done
    if ((!covered)) && [[ ",$mounts," != *",$dir:$dir,"* ]]; then
      mounts+="${mounts:+,}$dir:$dir"
    fi
  done
  DYN_CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE"
                      --container-name="${DYNAMOE_CONTAINER_NAME:-dynamoe}"
                      --container-mounts="$mounts${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
                      --container-workdir="$REPO")
  DYN_PYTHON=(srun --nodes=1 --ntasks=1 "${DYN_CONTAINER_ARGS[@]}" python)
}

# ---- planner -------------------------------------------------------------------------------
# Runs tools/plan_layout.py with the given flags; prints its report; on refusal ends the
# script with exit 2 (in a dry run too: the verdict is the exit status).
# DYN_PLAN_REPORT keeps the report for the run's snapshot. A requeued job runs with the
# environment it was submitted with, so its first start's verdict stands and is reused.
dyn_plan() {
  local rc=0 first=$RUN_DIR/snapshots/${SLURM_JOB_ID:-}-restart0/plan.txt
  if ((${SLURM_RESTART_COUNT:-0} > 0)) && grep -q '^verdict: fits' "$first" 2>/dev/null; then
    DYN_PLAN_REPORT=$(<"$first")
    dyn_log "layout checked at this job's first start: $(grep '^verdict' "$first")"
    return 0
  fi
  DYN_PLAN_REPORT=$(dyn_python "$REPO/tools/plan_layout.py" "$@" 2>&1) || rc=$?
  # The report and the verdict, without library import warnings.
  DYN_PLAN_REPORT=$(printf '%s\n' "$DYN_PLAN_REPORT" | grep -v -e 'Warning' -e 'warnings.warn' || true)
  printf '%s\n' "$DYN_PLAN_REPORT" >&2
  if ((rc != 0)); then
    dyn_log "the layout planner refused this layout (exit $rc): nothing was launched"
    exit "$rc"
  fi
}

# ---- checkpoints ---------------------------------------------------------------------------
# The metadata file of the checkpoint folder $1 (model.json; checkpoints written before it had
# that name call it dynamoe.json); prints nothing and fails when there is none. The tools
# rename a checkpoint into place only when it is complete, so the file means "done".
dyn_checkpoint_metadata() {
  local name
  for name in model.json dynamoe.json; do
    if [[ -f "$1/$name" ]]; then echo "$1/$name"; return 0; fi
  done
  return 1
}
dyn_is_checkpoint() { dyn_checkpoint_metadata "$1" >/dev/null; }

# ---- the training step ---------------------------------------------------------------------
# Latest complete checkpoint iteration in $1 (0 when none).
dyn_latest_iteration() {
  local pointer=$1/latest_checkpointed_iteration.txt
  if [[ -f "$pointer" ]]; then cat "$pointer"; else echo 0; fi
}

# Run "$@" (an srun command line) in the background and wait for it while staying
# responsive to signals. SIGTERM (preemption, scancel) reaches the srun step's tasks from SLURM
# itself; the batch shell must only outlive the step so that the trainers finish their
# checkpoint (if this shell died first, SLURM would kill the step mid-save).
dyn_run_step() {
  DYN_STEP_SIGNAL=""
  trap 'DYN_STEP_SIGNAL=TERM; dyn_log "SIGTERM: waiting for the training step to save and exit"' TERM
  trap 'DYN_STEP_SIGNAL=USR1; dyn_log "SIGUSR1: waiting for the training step to save and exit"' USR1
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  DYN_STEP_RC=0
  wait "$pid" || DYN_STEP_RC=$?
  trap - TERM USR1
}

# After a step: finished -> exit 0; stopped early after saving (time-limit warning,
# --exit-after-iters) -> requeue this job, which resumes from $SAVE_DIR; failed -> its status.
# A requeue without progress would loop forever: refused.
dyn_requeue_or_finish() {
  local before=$1 target=$2 after
  after=$(dyn_latest_iteration "$SAVE_DIR")
  if ((DYN_STEP_RC != 0)); then
    dyn_log "training step failed (exit $DYN_STEP_RC) at checkpoint iteration $after"
    exit "$DYN_STEP_RC"
  fi
  if ((after >= target)); then
    dyn_log "training finished: iteration $after of $target in $SAVE_DIR"
    exit 0
  fi
  if ((after <= before)); then
    dyn_die "the step stopped at iteration $after without a new checkpoint: not requeueing"
  fi
  if [[ "$DYN_STEP_SIGNAL" == TERM ]]; then
    dyn_log "preempted at iteration $after: SLURM requeues preempted jobs itself"
    exit 0
  fi
  dyn_log "stopped at iteration $after of $target: requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID" || dyn_die "scontrol requeue failed: resubmit; it resumes from $SAVE_DIR"
  exit 0
}

# ---- 70B defaults (moefy_70b.sh and convert_70b.sh agree on them) --------------------------
# 64 GPUs: TP=8 inside a node (NVLink), PP=4 x VPP=5 (4 layers per model chunk: the
# interleaved schedule cuts the 1F1B bubble (PP-1)/M from 4.7 % to 0.9 % at 64 micro-batches),
# EP=4 with expert TP 1 (Megatron's expert grid ETP x EP x PP = 16 divides 64 GPUs; 2 of the
# 8 shells per GPU, dealt serpentine, so every EP rank does the mean FFN fraction's work: with
# EP=8 the GPU holding the first shell, which every token needs, would set the pace at any
# theta; `tools/plan_layout.py --rank-expert-layouts`), DP=2, sequence parallel, distributed
# optimizer, no recompute (sdpa attention).
dyn_defaults_70b() {
  MODEL=${MODEL:-llama2-70b}
  case "$MODEL" in
    llama2-70b | llama3-70b) ;;
    *) dyn_die "MODEL=$MODEL: choose llama2-70b or llama3-70b" ;;
  esac
  CKPT_ROOT=${CKPT_ROOT:-$REPO/ckpt}
  HF_MODEL=${HF_MODEL:-}                       # Hugging Face folder (weights + tokenizer)
  DENSE_CKPT=${DENSE_CKPT:-$CKPT_ROOT/$MODEL}  # convert_70b.sh step 1 writes it
  DYNAMOE_CKPT=${DYNAMOE_CKPT:-$CKPT_ROOT/$MODEL-dynamoe}  # convert_70b.sh step 2 writes it
  NUM_SHELLS=${NUM_SHELLS:-8}
  TP=${TP:-8}
  PP=${PP:-4}
  VPP=${VPP-5}                                 # VPP= (empty) turns interleaving off
  EP=${EP:-4}
  ETP=${ETP:-1}
  MICRO_BATCH=${MICRO_BATCH:-1}
  GLOBAL_BATCH=${GLOBAL_BATCH:-128}
  SEQ_LEN=${SEQ_LEN:-4096}
  # The default sdpa attention keeps no s x s tensors, so selective recomputation (of core
  # attention) would cost time and save nothing; with ATTENTION_BACKEND=local use selective.
  RECOMPUTE=${RECOMPUTE:-none}
  RECOMPUTE_METHOD=${RECOMPUTE_METHOD:-uniform}
  RECOMPUTE_NUM_LAYERS=${RECOMPUTE_NUM_LAYERS:-1}
  # GPU memory the planner fits into (nvidia-smi's total, as runtime.gpus;
  # GPU_MEMORY_GIB overrides).
  GPU_TYPE=${GPU_TYPE:-h100}
  case "$GPU_TYPE" in
    a100) GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-80} ;;
    h100) GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-79.6} ;;
    h200) GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-140.4} ;;
    *) dyn_die "GPU_TYPE=$GPU_TYPE: choose a100, h100 or h200 (or set GPU_MEMORY_GIB)" ;;
  esac
  # The project's image (docker/README.md); CONTAINER_IMAGE= (empty) runs without a container.
  CONTAINER_IMAGE=${CONTAINER_IMAGE-$REPO/docker/dynamoe.sqsh}
  TRANSFORMER_IMPL=${TRANSFORMER_IMPL:-local}  # or transformer_engine (needs TE in the image)
}

# DYN_LAYOUT: the layout as launch/train.py flags (the planner takes the same ones).
dyn_layout_flags() {
  DYN_LAYOUT=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
              --expert-model-parallel-size "$EP" --micro-batch-size "$MICRO_BATCH")
  if [[ -n "${VPP:-}" ]]; then DYN_LAYOUT+=(--virtual-pipeline-model-parallel-size "$VPP"); fi
  if [[ "${ETP:-$TP}" != "$TP" ]]; then DYN_LAYOUT+=(--expert-tensor-parallel-size "$ETP"); fi
  if ((TP > 1)); then DYN_LAYOUT+=(--sequence-parallel); fi
  case "${RECOMPUTE:-none}" in
    none) ;;
    selective) DYN_LAYOUT+=(--recompute-granularity selective) ;;
    full) DYN_LAYOUT+=(--recompute-granularity full --recompute-method "$RECOMPUTE_METHOD"
                       --recompute-num-layers "$RECOMPUTE_NUM_LAYERS") ;;
    *) dyn_die "RECOMPUTE=$RECOMPUTE: choose none, selective or full" ;;
  esac
}
