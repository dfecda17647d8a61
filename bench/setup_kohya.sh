#!/usr/bin/env bash
# kohya sd-scripts for `bench/bench_train.py --trainers ours,kohya,...` (see bench/kohya_trainer.py): cloned at the
# pinned commit into bench/out/kohya/sd-scripts (never vendored: bench/out is ignored by git), its packages installed
# beside it with pip --target into bench/out/kohya/deps. torch is not installed there: kohya runs on the pack's
# Python and torch (.venv), so both trainers use the same kernels.
#   bash bench/setup_kohya.sh [SOURCE]   SOURCE: a git URL or path (default: https://github.com/kohya-ss/sd-scripts)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
home="$root/bench/out/kohya"
source_repo="${1:-https://github.com/kohya-ss/sd-scripts}"
commit="$(sed -n 's/^KOHYA_COMMIT = "\([0-9a-f]*\)"$/\1/p' "$root/bench/kohya_trainer.py")"
python="$root/.venv/bin/python"
mkdir -p "$home"
if [ ! -e "$home/sd-scripts/.git" ]; then
  git clone --quiet "$source_repo" "$home/sd-scripts"
fi
git -C "$home/sd-scripts" -c advice.detachedHead=false checkout --quiet "$commit"
echo "sd-scripts at $(git -C "$home/sd-scripts" rev-parse HEAD)"
# sd-scripts' requirements.txt pins, less torch (the pack's); --no-deps so nothing pulls another torch
"$python" -m pip install --quiet --target "$home/deps" --no-deps \
  diffusers==0.32.1 accelerate==1.6.0 voluptuous==0.15.2 imagesize==1.4.1 opencv-python-headless==4.10.0.84 \
  ftfy==6.3.1 rich==14.1.0 wcwidth markdown-it-py mdurl pygments transformers==4.54.1 "tokenizers>=0.21,<0.22" \
  huggingface-hub==0.34.3
echo "kohya's packages in $home/deps"
