"""What the end-to-end benchmarks share: real services, a real job, a real worker process.

A job is enqueued with the real ``producer`` command and run by a real ``worker`` process
against a local Redis and SeaweedFS (``fewstep.services``). Its end-to-end rate comes from
the per-shard stats objects the worker writes: images over the span from the job's first
batch on the device to the last shard's commit (model loading, warm-up and a one-shard warm-up job are
not in it). The worker's and SeaweedFS's CPU time over that span is sampled from ``/proc``;
so is the worker process's whole life (start to exit: imports, model load, warm-up, every
job), for the wall-clock rate and CPU per image that include the start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fewstep import services  # noqa: E402
from fewstep.contract import STATS, ShardStats  # noqa: E402
from fewstep.storage import open_store  # noqa: E402

BUCKET = "fewstep-bench"
TICKS = os.sysconf("SC_CLK_TCK")


def machine() -> str:
    """One line about the machine and how busy it is."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    cores = len(os.sched_getaffinity(0))
    return (
        f"{platform.node()}: {cores} cores ({cpu}), Python {platform.python_version()}, "
        f"load average {load} at {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    )


@contextlib.contextmanager
def local_redis():
    """Redis alone on 127.0.0.1 (for local-directory output); yields the commands' environment."""
    with tempfile.TemporaryDirectory(prefix="fewstep-bench-") as directory:
        svc = services.Services(
            directory=directory,
            redis_port=services.free_port(),
            redis_password=secrets.token_urlsafe(18),
            s3_port=0,
            access_key="",
            secret_key="",
        )
        try:
            svc.start_redis()
            env = {**os.environ, "CELERY_BROKER_URL": svc.broker_url, "HF_HUB_OFFLINE": "1",
                   "PYTHONUNBUFFERED": "1"}  # fmt: skip
            os.environ["CELERY_BROKER_URL"] = svc.broker_url
            yield env
        finally:
            svc.stop_redis()


@contextlib.contextmanager
def local_services():
    """Redis + SeaweedFS on 127.0.0.1 for the duration; yields them and the commands' environment."""
    with tempfile.TemporaryDirectory(prefix="fewstep-bench-") as directory:
        svc = services.start(directory, [BUCKET])
        try:
            env = {**os.environ, **svc.env(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
            os.environ.update(svc.env())
            yield svc, env
        finally:
            svc.stop()


def write_prompts(path: Path, count: int) -> Path:
    """A PartiPrompts-style TSV with ``count`` distinct prompts."""
    lines = ["Prompt\tCategory\tChallenge\tNote"]
    lines += [f"a synthetic benchmark prompt number {i}\tBench\tBasic\t" for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


class CpuSampler:
    """Samples a process's CPU seconds every ``every`` seconds (wall time, CPU seconds)."""

    def __init__(self, pid: int, every: float = 0.05):
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            cpu = _cpu_seconds(self.pid)
            if cpu is None:
                return
            self.samples.append((time.time(), cpu))
            time.sleep(self.every)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> float:
        """CPU seconds used between two wall-clock times (nearest samples inside)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        return inside[-1][1] - inside[0][1] if len(inside) >= 2 else float("nan")


def _span(stats: list[ShardStats]) -> tuple[float, float]:
    # From the first batch on the device: batches generated ahead count from when they ran.
    start = min(dt.datetime.fromisoformat(s.first_batch_at).timestamp() for s in stats)
    return start, max(dt.datetime.fromisoformat(s.finished_at).timestamp() for s in stats)


@dataclass
class JobRun:
    """A measured job: images, its span in seconds, CPU used over it, per-shard stats."""

    images: int
    seconds: float
    cpu_seconds: float  # the worker process's, over the job's span
    storage_cpu_seconds: float  # SeaweedFS's, over the same span (nan: not sampled)
    stats: list[ShardStats]

    @property
    def rate(self) -> float:
        """Images/s from the job's first batch on the device to its last shard's commit."""
        return self.images / self.seconds

    def total(self, name: str) -> float:
        """A stats field summed over the shards."""
        return sum(getattr(s, name) for s in self.stats)


@dataclass
class WorkerLife:
    """One worker process from its start to its exit, over every job it ran."""

    images: int  # every image it committed, warm-up job included
    seconds: float  # from the process's start (before importing anything) to its last commit
    cpu_seconds: float  # the whole process's CPU (all threads, user + system) over its life


def _enqueue(
    env, prompts: Path, model: str, images: int, shard_size: int, job_args: list[str], output: str
) -> str:
    job = "bench-" + uuid.uuid4().hex[:8]
    result = subprocess.run(
        [sys.executable, "-m", "producer", "enqueue", "partiprompts", "--path", str(prompts),
         "--model", model, "--allow-synthetic", "--job", job, "--output", output,
         "--limit", str(images), "--shard-size", str(shard_size), "--json", *job_args],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"enqueue failed: {result.stderr}")
    return json.loads(result.stdout)["job_url"]


def run_jobs(
    env: dict[str, str],
    prompts: Path,
    *,
    model: str,
    jobs: list[tuple[int, list[str]]],
    shard_size: int,
    worker_args: list[str],
    worker_env: dict[str, str] | None = None,
    log_path: Path | None = None,
    storage_pid: int | None = None,
    output: str = f"s3://{BUCKET}/bench",
    timeout: float | None = None,
) -> tuple[list[JobRun], ShardStats, WorkerLife]:
    """Run ``jobs`` (images, ``producer enqueue`` flags) for ``model`` through one fresh worker,
    in that order; returns each job's run, the first shard of the worker's life and the life.

    The worker first runs a one-shard warm-up job, as a long-running worker would have: its
    first shard pays for the process's one-time set-up (connections, threads, first calls),
    which is reported apart, not mixed into the measured rates.
    """
    env = {**env, "FEWSTEP_QUEUE_PREFIX": "b" + uuid.uuid4().hex[:10]}  # worker_env: the worker's alone
    warm_url = _enqueue(env, prompts, model, shard_size, shard_size, jobs[0][1], output)
    urls = [_enqueue(env, prompts, model, images, shard_size, args, output) for images, args in jobs]
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    started = time.time()
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "--model", model, "--exit-when-idle", "1", *worker_args],
        env={**env, **(worker_env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    sampler = CpuSampler(worker.pid)
    storage = CpuSampler(storage_pid) if storage_pid else None
    try:
        code = worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        raise SystemExit(f"worker still running after {timeout:.0f}s: killed") from None
    finally:
        sampler.stop()
        if storage:
            storage.stop()
    if code != 0:
        raise SystemExit(f"worker exited with {code}" + (f", see {log_path}" if log_path else ""))
    (first,) = _stats(warm_url)
    runs = []
    for (images, _), url in zip(jobs, urls, strict=True):
        stats = _stats(url)
        if sum(s.images for s in stats) != images:
            raise SystemExit(f"{url}: stats cover {sum(s.images for s in stats)} images, expected {images}")
        start, end = _span(stats)
        storage_cpu = storage.between(start, end) if storage else float("nan")
        runs.append(JobRun(images, end - start, sampler.between(start, end), storage_cpu, stats))
    last = max(dt.datetime.fromisoformat(s.finished_at).timestamp() for r in runs for s in r.stats)
    cpu = sampler.samples[-1][1] if sampler.samples else float("nan")
    life = WorkerLife(first.images + sum(r.images for r in runs), last - started, cpu)
    return runs, first, life


def run_job(
    env: dict[str, str],
    prompts: Path,
    *,
    model: str,
    images: int,
    shard_size: int,
    job_args: list[str],
    worker_args: list[str],
    worker_env: dict[str, str] | None = None,
    log_path: Path | None = None,
    storage_pid: int | None = None,
) -> tuple[JobRun, ShardStats]:
    """Run ``images`` prompts for ``model`` through one fresh worker (see :func:`run_jobs`);
    returns the measured job's run and the first shard of the worker's life."""
    (run,), first, _ = run_jobs(
        env,
        prompts,
        model=model,
        jobs=[(images, job_args)],
        shard_size=shard_size,
        worker_args=worker_args,
        worker_env=worker_env,
        log_path=log_path,
        storage_pid=storage_pid,
    )
    return run, first


def _stats(job_url: str) -> list[ShardStats]:
    store = open_store(job_url)
    return [ShardStats.from_json(json.loads(store.get(k))) for k, _ in store.list(f"{STATS}/")]
