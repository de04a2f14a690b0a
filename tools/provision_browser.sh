#!/usr/bin/env bash
# What the real-browser test needs, kept out of the test venv: ComfyUI's own frontend package
# (the version the ComfyUI under test pins) and Python playwright in one --target folder under the
# provisioning cache, plus Debian's chromium at /usr/bin/chromium. Never `playwright install`:
# it downloads a browser build, which this project's machines cannot fetch.
# Idempotent: a second run only checks a marker. Progress to stderr; the export line to stdout:
#   EI_BROWSER_SITE  the folder to put on PYTHONPATH / sys.path (only for the browser test)
set -euo pipefail
say() { echo "[provision_browser] $*" >&2; }

# the frontend the ComfyUI under test pins (1.32.9 for 0.3.75, 1.49.6 for 0.33.0)
FRONTEND=$(grep -hs '^comfyui-frontend-package==' "${COMFYUI_DIR:-}/requirements.txt" || true)
FRONTEND=${FRONTEND:-comfyui-frontend-package==1.32.9}
PLAYWRIGHT=playwright==1.65.2
CHROMIUM=/usr/bin/chromium
py=${COMFY_PYTHON:-python3}

key=$( (cat "$0"; echo "$FRONTEND"; "$py" -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -c1-16)
cache=${EXACT_INVERSION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-exact-inversion}
site=$cache/browser-$key
mkdir -p "$cache"
exec 9>"$cache/.browser.lock"
flock 9   # concurrent test runs wait for one install

if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" != 0 ]; then
    say "$CHROMIUM is missing and installing it needs root: apt-get install chromium"; exit 3
  fi
  say "installing Debian's chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends chromium >&2
fi

if [ ! -f "$site/.ready" ]; then
  start=$SECONDS
  rm -rf "$site"
  say "installing $FRONTEND and $PLAYWRIGHT into $site"
  "$py" -m pip install -q --disable-pip-version-check --target "$site" "$FRONTEND" "$PLAYWRIGHT" >&2
  touch "$site/.ready"
  say "ready in $((SECONDS - start)) s"
fi
echo "export EI_BROWSER_SITE='$site'"
