"""Helpers the tests share: run the real commands, start real workers, wait for jobs."""

from __future__ import annotations

import io
import json
import select
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fewstep.storage import open_store


def module_env(local_services, model_cache) -> dict[str, str]:
    """The environment of a module fixture's workers and commands: the session's services, the
    model cache, offline, and a queue prefix of the module's own."""
    import os
    import uuid

    return {
        **os.environ,
        **local_services.env(),
        "HF_HUB_OFFLINE": "1",
        "FEWSTEP_MODEL_CACHE": str(model_cache),
        "FEWSTEP_QUEUE_PREFIX": "t" + uuid.uuid4().hex[:10],
        "PYTHONUNBUFFERED": "1",
    }


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
    """Follow ``producer status --watch --json`` until the job is done (or fail after ``timeout``).

    One command follows the job, as a user would, instead of a command per poll: each command
    start imports pyarrow, boto3 and Celery (about a CPU-second), which the workers under test
    would otherwise lose. A watch that ends on ``failed`` is started again, since a retry may
    still complete the job.
    """
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        args = ["status", job, "--output", output, "--json", "--watch", "--interval", "0.5"]
        watch = subprocess.Popen(
            [sys.executable, "-m", "producer", *args], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([watch.stdout], [], [], left)
                line = watch.stdout.readline() if ready else ""
                if not line:
                    break  # the watch ended (done, failed or an error) or the time is up
                status = json.loads(line)
                if status["state"] == "done":
                    return status
        finally:
            watch.kill()
            watch.wait()
            watch.stdout.close()
        time.sleep(0.5)
    raise AssertionError(f"job {job} not done after {timeout}s: {status}")


def committed_metadata(job_url: str) -> pa.Table:
    """All committed metadata of a job, read from storage, in row order."""
    store = open_store(job_url)
    tables = [pq.read_table(io.BytesIO(store.get(key))) for key, _ in store.list("metadata/")]
    return pa.concat_tables(tables).sort_by("row_id")


def layout_or_files(args: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``producer enqueue`` arguments with ``--layout files`` unless they name a layout.

    The configured default is webdataset (one tar per shard); the enqueue helpers of the tests
    state the files layout through this, since their tests read single images by key
    (``images/part-N/<attempt>/<row>.png``) and count shards of the files layout's size (256).
    ``tests/test_layouts.py`` checks the real default."""
    return tuple(args) if "--layout" in args else (*args, "--layout", "files")


def run_job(env: dict[str, str], output: str, job: str, path: Path, tmp_path: Path, *extra: str) -> dict:
    """Enqueue ``path`` as ``job`` with the tiny model (files layout unless ``extra`` names one),
    run a real worker until the queue is empty, and return the enqueue summary."""
    summary = cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(path), "--model", "tiny",
        "--job", job, "--output", output, *layout_or_files(extra), env=env,
    )  # fmt: skip
    run_worker_until_idle(env, tmp_path / f"worker-{job}.log")
    return summary


def run_worker_until_idle(env: dict[str, str], log_path: Path, *args: str) -> None:
    """A real worker that exits once its queue has been empty for 2 seconds."""
    worker = start_worker(env, "--exit-when-idle", "2", *args, log_path=log_path)
    try:
        assert worker.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    finally:
        worker.kill()


# --- fault tests -----------------------------------------------------------------


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop_worker(worker: subprocess.Popen, timeout: float = 120) -> int:
    """SIGTERM a worker (Celery's warm shutdown) and wait; SIGKILL it if it hangs."""
    if worker.poll() is None:
        worker.terminate()
    try:
        return worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        raise AssertionError(f"worker {worker.pid} did not stop within {timeout}s") from None


def attempt_records(job_url: str, shard: int) -> list[dict]:
    """The attempt records of one shard, oldest first."""
    store = open_store(job_url)
    prefix = f"attempts/part-{shard:06d}/"
    return [json.loads(store.get(key)) for key, _ in sorted(store.list(prefix))]


def config_dir(tmp_path: Path, **sections: dict) -> str:
    """A copy of ``config/`` with some ``defaults.toml`` values changed, for ``FEWSTEP_CONFIG_DIR``."""
    source = Path(__file__).resolve().parent.parent / "config"
    target = tmp_path / "config"
    target.mkdir(exist_ok=True)
    for path in source.glob("*.toml"):
        (target / path.name).write_text(path.read_text())
    lines, section = [], ""
    for line in (source / "defaults.toml").read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        key = line.split("=", 1)[0].strip()
        if key in sections.get(section, {}) and "=" in line:
            line = f"{key} = {json.dumps(sections[section][key])}"
        lines.append(line)
    (target / "defaults.toml").write_text("\n".join(lines) + "\n")
    return str(target)


def verify_job(job: str, output: str, env: dict[str, str]) -> dict:
    """``producer verify --json``; fails the test on any mismatch."""
    result = cli("producer", "verify", job, "--output", output, "--json", env=env, check=False)
    summary = json.loads(result.stdout)
    assert result.returncode == 0 and summary["ok"], (summary, result.returncode, result.stderr[-2000:])
    return summary


def run_worker_until_done(
    env: dict[str, str], output: str, *jobs: str, args: tuple[str, ...] = (), model: str = "tiny",
    log_path: Path | None = None, timeout: float = 180, exit_timeout: float = 60,
) -> None:  # fmt: skip
    """Run a real worker (exiting when idle) until ``jobs`` are done (each within ``timeout``)
    and it has exited cleanly (within ``exit_timeout``)."""
    worker = start_worker(env, "--exit-when-idle", "2", *args, log_path=log_path, model=model)
    try:
        for job in jobs:
            wait_done(job, output, env, timeout=timeout)
        assert worker.wait(timeout=exit_timeout) == 0
    finally:
        worker.kill()
