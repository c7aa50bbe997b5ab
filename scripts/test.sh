#!/usr/bin/env bash
# Set up (.venv) and run the whole test suite: lint, then pytest against a real
# redis-server, SeaweedFS and worker processes started by the test fixtures.
#   ./scripts/test.sh                  everything: the suite in two pytest processes (each with
#                                      its own Redis and SeaweedFS), then the slow tests
#   ./scripts/test.sh ARGS...          pytest ARGS in one process (e.g. tests/test_worker.py -x)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .

# pytest's exit code 5 means it collected no tests: a failure here, never a pass. -rs: every
# skipped test is listed with its reason in the summary, so a skip never passes unseen.
run_pytest() {
  local status=0
  .venv/bin/python -m pytest -q -rs "$@" || status=$?
  if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests ($*)" >&2
    return 1
  fi
  return "$status"
}

if [ "$#" -gt 0 ]; then
  run_pytest "$@"
  exit $?
fi
status=0
run_pytest -n 2 -m "not slow" --durations=40 || status=$?
# The slow tests after the rest, one pytest process each so they overlap: the chaos run, the
# GPU host rehearsal (it waits on its installs) and smoke run, the Docker compose stack (it
# waits on its image build), the compose files read by Compose itself (which may install
# it first), and the producer-only install (it waits on pip). With fewer processes xdist hands
# two long ones to one process, one after the other: 472 s against 344 s for the first five,
# measured under a CPU burner.
run_pytest -n 6 -m slow -rsP --durations=6 || status=$?
exit "$status"
