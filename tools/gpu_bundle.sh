#!/usr/bin/env bash
# Prepare, here, what `make gpu-check` needs on a GPU machine that has Python 3.12 and a CUDA torch but no
# internet: ComfyUI 0.3.75's tree (as provisioned) and the wheels of its requirements that such a machine
# lacks, in .gpu_bundle/ (git-ignored; carry it). Everything else there is built on the machine itself.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash tools/provision.sh)"
out=.gpu_bundle
rm -rf "$out"; mkdir -p "$out/whl"
tar -C "$(dirname "$COMFYUI_DIR")" --exclude=__pycache__ --exclude=tests-unit -czf "$out/ComfyUI.tar.gz" "$(basename "$COMFYUI_DIR")"
# ComfyUI 0.3.75's requirements missing from the GPU image (pinned as in tools/requirements-comfyui.txt;
# their own dependencies pinned to what the CPU venv resolved). PyAV is stubbed (tools/gpu_stubs).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out/whl" \
  kornia==0.9.0 kornia_rs==0.2.0 torchsde==0.2.6 trampoline==0.1.2 pydantic==2.14.3 pydantic_core==2.50.4 \
  annotated-types==0.8.0 typing-inspection==0.4.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
  alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9
du -sh "$out" >&2
