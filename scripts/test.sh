#!/usr/bin/env bash
# Set up (.venv) and run the whole test suite: lint, then pytest against a real
# redis-server, SeaweedFS and worker processes started by the test fixtures.
#   ./scripts/test.sh                  everything: the suite in two pytest processes (each with
#                                      its own Redis and SeaweedFS), then the slow Docker test alone
#   ./scripts/test.sh ARGS...          pytest ARGS in one process (e.g. tests/test_worker.py -x)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .

# pytest's exit code 5 means it collected no tests: a failure here, never a pass.
run_pytest() {
  local status=0
  .venv/bin/python -m pytest -q "$@" || status=$?
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
# The Docker compose stack (tests/test_compose_stack.py) builds images and runs containers:
# alone, after the rest, so it neither slows nor is slowed by the workers of other tests.
run_pytest -m slow -rP || status=$?
exit "$status"
