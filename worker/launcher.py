"""``worker --gpus all|0,1,...``: one worker process per GPU on a multi-GPU host, one command.

The parent never initialises CUDA (it does not even import torch, see pytorch #40403): it
counts GPUs with ``nvidia-smi``, then starts one ``worker`` child per GPU with
``CUDA_VISIBLE_DEVICES`` set to that GPU alone, so each child sees one ``cuda`` device,
loads its own model and consumes the model's queue by itself. The host's cores are shared
out between the children's encode pools.

The parent forwards SIGTERM, SIGINT and SIGQUIT to every child (Celery's warm and cold
shutdowns) and exits once they all have: with 0 when they all exited cleanly. A child that
crashes is started again after a pause; one that stops on a user error (exit code 2, e.g.
an unknown model) stops them all, since every other child would fail the same way.
Children die with the parent (``PR_SET_PDEATHSIG``) even if it is killed outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from fewstep import UserError

log = logging.getLogger("fewstep.worker")

USER_ERROR_EXIT = 2
RESTART_DELAY = 5.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def visible_gpus() -> list[str] | None:
    """Indices of the NVIDIA GPUs ``nvidia-smi`` lists; None when there is no nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as e:
        raise UserError(f"nvidia-smi failed: {e}") from None
    return [line.strip() for line in out.splitlines() if line.strip()]


def nvidia_devices() -> list[str]:
    """The NVIDIA GPU device files (``/dev/nvidia0``, ...): a driver is there, even without nvidia-smi."""
    with contextlib.suppress(OSError):
        return sorted(n for n in os.listdir("/dev") if n.startswith("nvidia") and n[6:].isdigit())
    return []


def parse_gpus(value: str, available: list[str] | None) -> list[str]:
    """``all`` or a comma-separated list of indices, checked against the GPUs present."""
    if value == "all":
        if available is None:
            raise UserError("--gpus all: nvidia-smi not found, so no NVIDIA GPU can be counted")
        if not available:
            raise UserError("--gpus all: nvidia-smi lists no GPU")
        return available
    wanted = [part.strip() for part in value.split(",") if part.strip()]
    if not wanted or not all(part.isdigit() for part in wanted):
        raise UserError(f"--gpus {value!r}: use 'all' or GPU indices like 0,1,2")
    if len(set(wanted)) != len(wanted):
        raise UserError(f"--gpus {value!r} names a GPU twice")
    if available is not None:
        missing = [g for g in wanted if g not in available]
        if missing:
            raise UserError(f"--gpus: no GPU {', '.join(missing)} (nvidia-smi lists {', '.join(available)})")
    return wanted


def child_argv(argv: list[str], encode_threads: int) -> list[str]:
    """The worker's own arguments without ``--gpus``, pinned to ``cuda`` unless a device was named."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            args.append(arg)
    names = {a.split("=", 1)[0] for a in args}
    if _option(args, "--device") in (None, "auto"):
        args += ["--device", "cuda"]
    if "--encode-threads" not in names:
        args += ["--encode-threads", str(encode_threads)]
    return args


def _option(args: list[str], name: str) -> str | None:
    """The last value given for ``name`` (``--name value`` or ``--name=value``), as click reads it."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel for SIGTERM when the parent dies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Child:
    """A worker process and the GPU it is pinned to."""

    gpu: str
    process: subprocess.Popen
    started: float


class Launcher:
    """Starts, watches and stops one worker process per GPU."""

    def __init__(self, gpus: list[str], argv: list[str]):
        self.gpus = gpus
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.argv = child_argv(argv, max(1, cores // len(gpus)))
        self.children: dict[str, Child] = {}
        self.stopping = False
        self.exit_code = 0

    def start(self, gpu: str) -> Child:
        """Start the worker process for ``gpu``, pinned to it alone."""
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "FEWSTEP_WORKER_TAG": f"gpu{gpu}"}
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", *self.argv],
            env=env,
            start_new_session=True,  # terminal signals reach the parent only, which forwards them once
            preexec_fn=_die_with_parent,  # the parent is single-threaded
        )
        log.info("GPU %s: worker process %d started", gpu, process.pid)
        child = Child(gpu, process, time.monotonic())
        self.children[gpu] = child
        return child

    def forward(self, signum: int, _frame=None) -> None:
        """Pass a shutdown signal on to every child; nothing is restarted after it."""
        self.stopping = True
        for child in self.children.values():
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signum)

    def run(self) -> int:
        """Run until every child has exited; returns the exit code for the parent."""
        for signum in FORWARDED:
            signal.signal(signum, self.forward)
        for gpu in self.gpus:
            self.start(gpu)
        restarts: dict[str, float] = {}  # GPU → when its crashed worker starts again
        while self.children or (restarts and not self.stopping):
            time.sleep(0.2)
            for gpu, child in list(self.children.items()):
                code = child.process.poll()
                if code is None:
                    continue
                del self.children[gpu]
                log.info("GPU %s: worker process %d exited with %d", gpu, child.process.pid, code)
                if code == 0 or self.stopping:
                    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                        self.exit_code = self.exit_code or (code if code > 0 else 1)
                elif code == USER_ERROR_EXIT:
                    log.error("GPU %s: the worker stopped on a user error; stopping the others", gpu)
                    self.exit_code = code
                    self.forward(signal.SIGTERM)
                else:
                    log.error("GPU %s: the worker failed; starting it again in %.0fs", gpu, RESTART_DELAY)
                    restarts[gpu] = time.monotonic() + RESTART_DELAY
            for gpu, due in list(restarts.items()):
                if not self.stopping and time.monotonic() >= due:
                    del restarts[gpu]
                    self.start(gpu)
        return self.exit_code


def launch(gpus: str, argv: list[str], device: str) -> int:
    """Start one worker per GPU in ``gpus`` (``all`` or ``0,1,...``) and supervise them."""
    available = visible_gpus()
    if available is None and gpus != "all" and device != "cpu":
        if not nvidia_devices():
            # Every child would start, load and fail: say it once, before starting any.
            raise UserError(
                f"--gpus {gpus}: this machine has no NVIDIA GPU (no nvidia-smi, no /dev/nvidia*); "
                "on a CPU run one worker with --device cpu"
            )
        log.warning("nvidia-smi not found: starting workers for GPUs %s unchecked", gpus)
    chosen = parse_gpus(gpus, available)
    if device.startswith("cuda:"):
        raise UserError("--gpus pins each worker to one GPU: use --device cuda (or leave --device out)")
    log.info("starting %d worker processes, one per GPU: %s", len(chosen), ", ".join(chosen))
    return Launcher(chosen, argv).run()
