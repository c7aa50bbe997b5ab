"""`worker --device claim`: workers on one host take distinct GPUs through file locks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fewstep import UserError
from worker.gpu_claim import claim_gpu

CLAIM = "import sys; from pathlib import Path; from worker.gpu_claim import try_claim; " \
    "print(try_claim(int(sys.argv[1]), Path(sys.argv[2])), flush=True); sys.stdin.read()"  # fmt: skip


def claimer(count: int, locks: Path) -> tuple[subprocess.Popen, str]:
    """A process that claims a GPU and holds it until its stdin closes; and what it claimed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CLAIM, str(count), str(locks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline().strip()


def test_workers_on_one_host_claim_distinct_gpus_and_a_dead_workers_gpu_is_free_again(tmp_path):
    first, a = claimer(2, tmp_path)
    second, b = claimer(2, tmp_path)
    third, c = claimer(2, tmp_path)
    assert {a, b} == {"0", "1"} and c == "None"
    first.kill()  # however a worker ends, the kernel drops its lock
    first.wait()
    fourth, d = claimer(2, tmp_path)
    assert d == a
    for proc in (second, third, fourth):
        proc.stdin.close()
        proc.wait(timeout=30)


def test_claim_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        claim_gpu(0, tmp_path)
