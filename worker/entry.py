"""The ``worker`` console script: where the model stack is missing, one line naming the extra.

A producer-only host (``pip install fewstep``) has no torch, diffusers or transformers. The
worker imports them as it loads its model, after connecting to Redis, possibly in a child
process: a traceback there would come late and from deep inside. So before anything else, the
modules without which no worker can start must be importable. Only those: a GPU host that
brings its own stack (bench/device) may lack what one feature needs (peft for a LoRA preset,
OpenCV for Canny maps, fpng for PNG), and that feature says so when a job asks for it.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

#: The command that brings the worker's model stack, as a user types it.
INSTALL = "pip install 'fewstep[worker]'"
#: The modules every worker loads before its first shard (import names are the distributions').
CORE = ("torch", "diffusers", "transformers", "safetensors")


def missing_model_stack() -> list[str]:
    """The modules of :data:`CORE` that cannot be imported here (looked up, not imported)."""
    return [module for module in CORE if find_spec(module) is None]


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
