#!/usr/bin/env bash
# Download, on a machine with PyPI access, exactly the wheels of wheels.txt (what the offline GPU
# host lacks, at the lock's versions, and what it may have too old), for
# CPython 3.12 on manylinux x86-64, into bench/device/wheels/ (git-ignored). Fails, saying
# so, when they exceed the 64 MiB a device run may carry (wheels and repository together).
#
#   bash bench/device/fetch_wheels.sh     # PYTHON=/path/to/python: the pip to use; FEWSTEP_WHEELS_PYTHON=3.11:
#                                         # another Python version (to try the install path elsewhere)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$here/wheels"
budget_mib="${FEWSTEP_CARRY_BUDGET_MIB:-64}"
python="${PYTHON:-python3}"
version="${FEWSTEP_WHEELS_PYTHON:-3.12}"
platforms=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64 linux_x86_64; do
  platforms+=(--platform "$p")
done
rm -rf "$out.partial" && mkdir -p "$out.partial"
# What the host lacks comes at the lock's versions (constraints/lock-no-torch.txt, scripts/lock.sh):
# pip refuses a wheels.txt pin that differs. What the host has (host-packages.txt) follows the
# host's own stack (its transformers 5.17 needs huggingface_hub < 2), so the lock skips those.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$python" - "$repo/constraints/lock-no-torch.txt" "$here/host-packages.txt" > "$constraints" <<'EOF'
import re, sys
name = lambda line: re.match(r"[A-Za-z0-9._-]*", line).group(0).lower().replace("_", "-")
host = {name(line) for line in open(sys.argv[2]) if not line.startswith("#")}
print("".join(line for line in open(sys.argv[1]) if not line.startswith("#") and name(line) not in host))
EOF
# --no-deps: the lists are the whole closure; the host's own torch/transformers stack is never fetched.
if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp --abi "cp${version/./}" --abi abi3 --abi none "${platforms[@]}" -c "$constraints" \
    $(sed 's/#.*//' "$here/wheels.txt" | awk 'NF {print $1}') -d "$out.partial"; then
  echo "fetch_wheels: pip download failed (no PyPI access, a wheels.txt pin that differs from the lock's," \
       "or a pinned version without a CPython $version manylinux wheel)" >&2
  exit 1
fi
# The host has no git: the commit the wheels were fetched at travels with them (run.py reads it
# when neither FEWSTEP_COMMIT nor git can say).
(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo unknown) > "$out.partial/COMMIT"
rm -rf "$out" && mv "$out.partial" "$out"
wheels_bytes=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
# What else travels: the repository's tracked and untracked, not ignored files.
repo_bytes=$(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | awk '/total$/ {s+=$1} END {print s+0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "fetch_wheels: $(ls "$out"/*.whl | wc -l) wheels, $(mib "$wheels_bytes") MiB; repository $(mib "$repo_bytes") MiB;" \
     "together $(mib $((wheels_bytes + repo_bytes))) MiB of $budget_mib MiB"
ls -S "$out" | head -5 | sed 's/^/  largest: /'
if [ $((wheels_bytes + repo_bytes)) -gt $((budget_mib * 1048576)) ]; then
  echo "fetch_wheels: FAILED: over the $budget_mib MiB a device run may carry; drop a package or use a smaller version" >&2
  exit 1
fi
