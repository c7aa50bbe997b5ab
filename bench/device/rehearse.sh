#!/usr/bin/env bash
# The device run rehearsed on this CPU as the GPU host will meet it, from the repository root:
#
#   bash bench/device/rehearse.sh RESULTS_DIR [run.sh arguments, e.g. --smoke --models sdxs-512]
#
# - a CPython 3.12 virtualenv holding only the host's packages (host-packages.txt, installed
#   --no-deps from PyPI once, kept in ~/.cache/fewstep until the list changes): torch 2.11's
#   CUDA build as the host has it, running on the CPU; no tzdata, no diffusers, no celery;
# - no time-zone database (PYTHONTZPATH points nowhere: kombu's ZoneInfo("UTC") needs the
#   carried tzdata wheel) and no git on PATH (run.py must not need it);
# - the carried wheels (bench/device/wheels, fetched by fetch_wheels.sh if absent), installed by
#   run.sh from scratch (bench/device/site-rehearsal, removed first), as on a bare host;
# - a clean environment (env -i): nothing of this machine's settings leaks in.
# PYTHON312: the interpreter to build the virtualenv with [python3.12 on PATH, else pyenv's].
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [ $# -lt 1 ]; then
  echo "usage: bash bench/device/rehearse.sh RESULTS_DIR [run.sh arguments]" >&2
  exit 2
fi
# Kept outside the checkout (a fresh clone reuses it), one per version of the list.
want="$(sha256sum "$here/host-packages.txt" | cut -d' ' -f1)"
venv="${FEWSTEP_HOST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fewstep/host-venv-${want:0:12}}"
py312=""
for candidate in ${PYTHON312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
  if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    py312="$candidate"
    break
  fi
done
if [ -z "$py312" ]; then
  echo "rehearse.sh: no CPython 3.12 found (set PYTHON312)" >&2
  exit 2
fi
if [ "$(cat "$venv/.host-packages" 2>/dev/null)" != "$want" ]; then
  rm -rf "$venv"
  "$py312" -m venv "$venv"
  start=$(date +%s)
  # --no-deps: the list is the whole environment; nothing else may slip in.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
    --no-compile -r "$here/host-packages.txt"
  echo "$want" > "$venv/.host-packages"
  echo "rehearse.sh: host virtualenv built in $(( $(date +%s) - start )) s"
fi
if "$venv/bin/python" -c 'import tzdata' 2>/dev/null; then
  echo "rehearse.sh: the host virtualenv has tzdata, which the host lacks" >&2
  exit 1
fi
if ! ls "$here"/wheels/*.whl >/dev/null 2>&1; then
  bash "$here/fetch_wheels.sh"
fi
# A site folder of its own: a smoke run in this checkout at the same time uses bench/device/site.
site="$here/site-rehearsal"
rm -rf "$site"
# This machine's PATH without git (the host has none).
nogit="$(mktemp -d)"
trap 'rm -rf "$nogit"' EXIT
for dir in /usr/local/bin /usr/bin /bin; do
  for tool in "$dir"/*; do
    name="$(basename "$tool")"
    case "$name" in git | git-*) continue ;; esac
    [ -e "$nogit/$name" ] || ln -s "$tool" "$nogit/$name"
  done
done
env -i HOME="$HOME" PATH="$nogit" LANG=C.UTF-8 PYTHONTZPATH=/nonexistent PYTHON="$venv/bin/python" \
  FEWSTEP_DEVICE_SITE="$site" ${FEWSTEP_DEVICE_SECONDS:+FEWSTEP_DEVICE_SECONDS="$FEWSTEP_DEVICE_SECONDS"} \
  bash "$here/run.sh" "$@"
