"""``worker --device claim``: take one GPU of this host that no other worker holds.

Docker maps a GPU reservation of ``count: 1`` to device 0 in every container, so
``docker compose up --scale worker=N`` with such a reservation puts N workers on one GPU.
Instead each replica reserves all GPUs and claims one here: the first whose lock file in
the lock directory it can ``flock``. The kernel releases the lock when the process ends,
however it ends, and the lock holds across containers that share the directory as a
volume (and across plain processes on one host).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

from fewstep import UserError

log = logging.getLogger("fewstep.worker")

DEFAULT_LOCK_DIR = "/tmp/fewstep-gpu-locks"

# Open lock files: held for the life of the process.
_held: list[int] = []


def lock_dir() -> Path:
    """Where the per-GPU lock files live (``FEWSTEP_GPU_LOCK_DIR``); one directory per host."""
    return Path(os.environ.get("FEWSTEP_GPU_LOCK_DIR") or DEFAULT_LOCK_DIR)


def try_claim(count: int, directory: Path) -> int | None:
    """Lock the first free GPU of ``count``; its index, or None when all are held."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        fd = os.open(directory / f"gpu-{index}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held.append(fd)
        return index
    return None


def claim_gpu(count: int, directory: Path | None = None, poll_seconds: float = 30.0) -> str:
    """``cuda:N`` for a GPU no other worker on this host holds; waits while all are taken."""
    if count < 1:
        raise UserError("--device claim: no CUDA GPU is visible to this worker")
    directory = directory or lock_dir()
    warned = False
    while True:
        index = try_claim(count, directory)
        if index is not None:
            log.info("claimed GPU %d of %d (lock in %s)", index, count, directory)
            return f"cuda:{index}"
        if not warned:
            warned = True
            log.warning("all %d GPUs are held by other workers; waiting for one to be free", count)
        time.sleep(poll_seconds)


def cuda_device_count() -> int:
    """How many CUDA devices this process sees (safe here: the solo pool never forks)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
