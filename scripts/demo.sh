#!/usr/bin/env bash
# Set up (.venv), then run one job end to end: local Redis + SeaweedFS, `producer enqueue`
# of a small prompt set with the tiny model, a real worker until the job is done.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/fewstep demo "$@"
