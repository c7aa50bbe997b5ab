"""``worker --gpus``: one worker process per GPU, pinned with CUDA_VISIBLE_DEVICES.

This machine has no GPU, so the children run the tiny model with ``--device cpu``: what is
checked is the launcher's part (processes, pinning, signals, restarts), not CUDA.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep import UserError
from tests.support import cli, wait_done, wait_for
from tests.test_cli_errors import assert_one_line_error
from tests.test_end_to_end import SAMPLE, enqueue
from worker.launcher import child_argv, nvidia_devices, parse_gpus, visible_gpus


def launch(env, log: Path, *args: str) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--model", "tiny", "--gpus", "0,1", "--device", "cpu", *args],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def children(log: Path) -> dict[str, list[int]]:
    """GPU → pids of the worker processes the launcher started for it, in order."""
    started: dict[str, list[int]] = {}
    for gpu, pid in re.findall(r"GPU (\d+): worker process (\d+) started", log.read_text()):
        started.setdefault(gpu, []).append(int(pid))
    return started


def pinned_gpu(pid: int) -> str | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    values = [e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"CUDA_VISIBLE_DEVICES=")]
    return values[0] if values else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def both_ready(log: Path) -> bool:
    return log.read_text().count("ready.") >= 2


def test_one_pinned_worker_per_gpu_shares_the_queue_and_stops_on_sigterm(env, output, tmp_path):
    job = enqueue(SAMPLE, "multi", output, env, "--shard-size", "4", "--limit", "16")
    log = tmp_path / "launcher.log"
    parent = launch(env, log)
    try:
        wait_for(lambda: both_ready(log), 120, "two ready workers")
        pids = children(log)
        assert sorted(pids) == ["0", "1"]
        for gpu, (pid,) in pids.items():
            assert pinned_gpu(pid) == gpu
        text = log.read_text()
        assert "gpu0 INFO" in text and "gpu1 INFO" in text  # each child's lines say which GPU
        assert text.count("loaded model tiny") == 2  # each loads its own model
        wait_done("multi", output, env)
        assert job["shards"] == 4
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=90) == 0
        for (pid,) in pids.values():
            wait_for(lambda pid=pid: not alive(pid), 30, f"worker {pid} to exit")
    finally:
        parent.kill()


def test_a_crashed_worker_is_restarted_and_workers_die_with_the_launcher(env, tmp_path):
    log = tmp_path / "launcher.log"
    parent = launch(env, log)
    try:
        wait_for(lambda: both_ready(log), 120, "two ready workers")
        (first,) = children(log)["1"]
        os.kill(first, signal.SIGKILL)
        restarted = wait_for(lambda: len(children(log)["1"]) == 2 and children(log)["1"][1], 120, "a restart")
        assert restarted != first and pinned_gpu(restarted) == "1"
        assert "GPU 1: the worker failed" in log.read_text()
        survivors = [children(log)["0"][0], restarted]
        parent.kill()  # no chance to forward anything: the kernel's parent-death signal stops them
        parent.wait(timeout=30)
        for pid in survivors:
            wait_for(lambda pid=pid: not alive(pid), 60, f"worker {pid} to exit")
    finally:
        parent.kill()


def test_gpus_all_without_nvidia_smi_is_one_clear_error(env, tmp_path):
    bare_path = {**env, "PATH": str(tmp_path)}  # no nvidia-smi on it
    result = cli("worker", "--model", "tiny", "--gpus", "all", env=bare_path, check=False)
    assert_one_line_error(result, "--gpus all", "nvidia-smi not found")
    assert result.returncode == 2


@pytest.mark.skipif(bool(nvidia_devices()), reason="this machine has NVIDIA device files")
def test_gpus_on_a_machine_without_gpus_start_no_worker(env, tmp_path):
    bare_path = {**env, "PATH": f"{tmp_path}:{os.path.dirname(sys.executable)}"}  # no nvidia-smi
    result = cli("worker", "--model", "tiny", "--gpus", "0,1", env=bare_path, check=False, timeout=60)
    assert_one_line_error(result, "--gpus 0,1: this machine has no NVIDIA GPU", "--device cpu")
    assert "starting" not in result.stdout


def test_gpus_are_counted_with_nvidia_smi(tmp_path, monkeypatch):
    # A stand-in for the NVIDIA tool only (nothing else here is faked): it prints what
    # `nvidia-smi --query-gpu=index --format=csv,noheader` prints on a 3-GPU host.
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert visible_gpus() == ["0", "1", "2"]
    assert parse_gpus("all", ["0", "1", "2"]) == ["0", "1", "2"]
    assert parse_gpus("2,0", ["0", "1", "2"]) == ["2", "0"]
    for bad, message in (("3", "no GPU 3"), ("0,0", "twice"), ("x", "indices"), ("", "indices")):
        with pytest.raises(UserError, match=message):
            parse_gpus(bad, ["0", "1", "2"])


def test_children_get_the_workers_own_arguments_pinned_to_cuda():
    assert child_argv(["--model", "m", "--gpus", "all", "--batch-size", "8"], 4) == [
        "--model", "m", "--batch-size", "8", "--device", "cuda", "--encode-threads", "4",
    ]  # fmt: skip
    assert child_argv(["--gpus=0,1", "--model", "m", "--device", "cpu", "--encode-threads", "2"], 4) == [
        "--model", "m", "--device", "cpu", "--encode-threads", "2",
    ]  # fmt: skip
    assert child_argv(["--model", "m", "--device=cpu", "--batch-size", "auto", "--gpus", "0"], 2) == [
        "--model", "m", "--device=cpu", "--batch-size", "auto", "--encode-threads", "2",
    ]  # fmt: skip
    assert child_argv(["--model", "m", "--device", "auto"], 2)[-4:] == [
        "--device",
        "cuda",
        "--encode-threads",
        "2",
    ]


def test_the_launcher_never_imports_torch(env):
    code = (
        "import sys; from worker import cli, launcher; "
        "launcher.parse_gpus('0,1', None); "
        "assert 'torch' not in sys.modules, 'the launcher imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
