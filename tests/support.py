"""Helpers the tests share: run the real commands, start real workers, wait for jobs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fewstep.storage import open_store


def cli(tool: str, *args: str, env: dict[str, str], check: bool = True, timeout: float = 120):
    """Run ``python -m producer|worker|fewstep ARGS`` as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", tool, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def cli_json(tool: str, *args: str, env: dict[str, str]) -> dict:
    return json.loads(cli(tool, *args, "--json", env=env).stdout)


def start_worker(
    env: dict[str, str], *args: str, log_path: Path | None = None, model: str = "tiny"
) -> subprocess.Popen:
    """A real worker process, by default for the tiny model on the CPU (more flags via ``args``)."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--model", model, "--device", "cpu", *args],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def wait_done(job: str, output: str, env: dict[str, str], timeout: float = 180) -> dict:
    """Poll ``producer status --json`` until the job is done (or fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = cli_json("producer", "status", job, "--output", output, env=env)
        if status["state"] == "done":
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job} not done after {timeout}s: {status}")


def committed_metadata(job_url: str) -> pa.Table:
    """All committed metadata of a job, read from storage, in row order."""
    store = open_store(job_url)
    tables = [pq.read_table(io.BytesIO(store.get(key))) for key, _ in store.list("metadata/")]
    return pa.concat_tables(tables).sort_by("row_id")


def run_worker_until_done(
    env: dict[str, str], output: str, *jobs: str, args: tuple[str, ...] = (), model: str = "tiny",
    log_path: Path | None = None,
) -> None:  # fmt: skip
    """Run a real worker (exiting when idle) until ``jobs`` are done and it has exited cleanly."""
    worker = start_worker(env, "--exit-when-idle", "2", *args, log_path=log_path, model=model)
    try:
        for job in jobs:
            wait_done(job, output, env)
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()
