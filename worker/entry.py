"""The ``worker`` console script: where the model stack is missing, one line naming the extra.

A producer-only host (``pip install fewstep``) has no torch, diffusers or transformers. The
worker imports them as it loads its model, after connecting to Redis, possibly in a child
process: a traceback there would come late and from deep inside. So before anything else, the
``[worker]`` extra's packages (as fewstep's installed metadata lists them) must all be installed.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

#: The command that brings the worker's model stack, as a user types it.
INSTALL = "pip install 'fewstep[worker]'"


def missing_model_stack() -> list[str]:
    """The ``[worker]`` extra's distributions not installed here; none where fewstep itself is not
    installed (run from a checkout, as bench/device does), which has no metadata to read."""
    try:
        requires = metadata.requires("fewstep") or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requires:
        spec, _, marker = requirement.partition(";")
        if re.search(r"""extra\s*==\s*["']worker["']""", marker):
            name = re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0)
            try:
                metadata.version(name)
            except metadata.PackageNotFoundError:
                missing.append(name)
    return missing


def main() -> None:
    """Run the ``worker`` command, or say in one line which install this environment lacks."""
    missing = missing_model_stack()
    if not missing:
        try:
            from worker.cli import main as run
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in {"fewstep", "producer", "worker"}:  # our own: a bug
                raise
            missing = [e.name or "?"]
    if missing:
        sys.stderr.write(
            f"error: the worker needs its model stack ({', '.join(missing)} not installed): {INSTALL}\n"
        )
        sys.exit(2)
    run()
