#!/usr/bin/env bash
# Pin every dependency of fewstep and its extras, from pyproject.toml, into constraints/:
#
#   constraints/lock.txt            the whole set, torch 2.13.0 included: what CPU machines and CI
#                                   install (scripts/setup.sh: pip install -c constraints/lock.txt)
#   constraints/lock-no-torch.txt   the same less torch, torchvision and what only they need (CUDA
#                                   libraries, triton, sympy): for hosts that bring their own torch
#                                   build (the Dockerfile's CUDA base, GPU hosts, bench/device)
#
#   bash scripts/lock.sh                              keep today's pins; resolve only what changed
#   bash scripts/lock.sh --upgrade                    the newest releases of everything
#   bash scripts/lock.sh --upgrade-package diffusers  one package (and what it needs) anew
#   bash scripts/lock.sh --prefer-venv                a package new to the lock at the version .venv
#                                                     has (what the tests ran), where it fits
#
# uv resolves for every Python >= 3.11 and every platform at once (--universal): one file for
# CI's 3.11, the GPU host's 3.12 and aarch64, where pip-tools would need one run per interpreter.
# pip installs it: uv is needed only here. torch stays at FEWSTEP_TORCH_VERSION (2.13.0), the CPU
# build these machines carry, so that a refresh never sends CPU machines to a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
uv_version=0.13.9
torch_version="${FEWSTEP_TORCH_VERSION:-2.13.0}"
tools="${XDG_CACHE_HOME:-$HOME/.cache}/fewstep/uv-$uv_version"
if [ ! -x "$tools/bin/uv" ]; then
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet "uv==$uv_version"
fi
mkdir -p constraints
touch constraints/lock.txt
torch_pin="$(mktemp)"
backup="$(mktemp)"
trap 'rm -f "$torch_pin" "$backup"' EXIT
cp constraints/lock.txt "$backup"
if [ "${1:-}" = --prefer-venv ]; then
  shift
  # uv prefers the versions already in its output file: add .venv's for packages not pinned yet.
  pinned="$(sed -n 's/^\([A-Za-z0-9._-]*\)==.*/\1/p' constraints/lock.txt | tr 'A-Z_' 'a-z-')"
  .venv/bin/python -m pip freeze --exclude-editable | sed 's/+[A-Za-z0-9.]*$//' | while read -r line; do
    name="$(echo "${line%%==*}" | tr 'A-Z_' 'a-z-')"
    echo "$pinned" | grep -qx "$name" || echo "$line"
  done >> constraints/lock.txt
fi
echo "torch==$torch_version" > "$torch_pin"
# The existing lock.txt is uv's preference: pins stay unless a requirement moved past them.
if ! "$tools/bin/uv" pip compile pyproject.toml --all-extras --universal --python-version 3.11 \
    --constraint "$torch_pin" --annotation-style line --no-header --quiet \
    --output-file constraints/lock.txt "$@"; then
  cp "$backup" constraints/lock.txt  # unchanged, without --prefer-venv's additions
  echo "lock.sh: uv could not resolve pyproject.toml; constraints/ left as it was" >&2
  exit 1
fi
python3 - <<'EOF'
import re
from pathlib import Path

HEADER = """\
# Pinned by scripts/lock.sh from pyproject.toml (uv pip compile --universal: Python >= 3.11,
# every platform). Do not edit: change pyproject.toml, then run bash scripts/lock.sh.
"""
FAMILY = {"torch", "torchvision"}
lock = Path("constraints/lock.txt")
# The torch pin comes from a temporary file: its name in an annotation would change every run.
lines = [
    re.sub(r"(, )?-c [^,]*", "", line)
    for line in lock.read_text().splitlines()
    if line and not line.startswith("#")
]
via = {}
for line in lines:
    name = re.match(r"[A-Za-z0-9._-]+", line).group(0).lower()
    parents = line.split("# via", 1)[1] if "# via" in line else ""
    via.setdefault(name, set()).update(p.strip().lower() for p in parents.split(",") if p.strip())
# torch's family and whatever only the family needs: a host's own torch build brings those.
dropped = set(FAMILY)
while True:
    more = {n for n, ps in via.items() if n not in dropped and ps and ps <= dropped}
    if not more:
        break
    dropped |= more
kept = [line for line in lines if re.match(r"[A-Za-z0-9._-]+", line).group(0).lower() not in dropped]
lock.write_text(HEADER + "\n".join(lines) + "\n")
Path("constraints/lock-no-torch.txt").write_text(
    HEADER + "# Less torch, torchvision and what only they need: " + ", ".join(sorted(dropped - FAMILY))
    + ".\n" + "\n".join(kept) + "\n"
)
print(f"lock.sh: {len(lines)} pins in constraints/lock.txt, {len(kept)} in constraints/lock-no-torch.txt")
EOF
