"""A seeded chaos run of a real fleet: faults drawn from a seed while real workers run real jobs,
then an independent checker judges the dataset (docs/RELIABILITY.md, "Chaos run").

    python -m bench.chaos --seed 7 --duration 150 [--workers 6] [--out DIR]

Real services: ``redis-server`` with AOF on and SeaweedFS (``weed mini``), both on 127.0.0.1
with credentials and restarted by the harness on the same ports and data. Workers (the ``tiny``
model on the CPU, batch sizes 1, 2 and 4) reach SeaweedFS through a delaying proxy
(``bench/slow_s3.py``); operators reach it directly. Jobs in all three layouts, one scored
(``--score clip --embeddings``, on the tiny scorer replicas of ``tests/replicas``) and one
image-conditioned, are enqueued in rounds so the fleet has work for the whole run. Each round
also has a "big" webdataset job whose tars (about 6 MiB a shard) are streamed in multipart
uploads of 5 MiB parts, so slow storage holds part uploads, kills leave unfinished uploads,
and ``reconcile`` has uploads to abort; after the final reconcile none may be left.

The fault schedule is a pure function of ``--seed``, ``--duration``, ``--workers`` and
``--rate`` (:func:`plan`; ``--rate N``: N faults of every kind per 1,000 s, a dense soak):
it is printed before anything starts, so a failing seed replays the same schedule.
Kinds: ``kill`` (SIGKILL a worker; a new one takes its slot), ``pause``
(SIGSTOP, SIGCONT after the duration), ``redis`` and ``storage`` (stopped, restarted after the
duration), ``slow`` (the proxy holds marker PUTs, part uploads and LISTs), ``skew`` (a worker's
slot restarted under libfaketime with a clock offset; some slots start skewed too), and
operator commands throughout: ``producer gc JOB --delete --abandoned-after 1``, ``producer
reconcile JOB --abandoned-after 1``, ``producer retry JOB --failed``.

At the end the faults stop, reconcile and retry run until every job is complete (bounded),
the workers are stopped, and the checker reads storage itself (boto3, pyarrow; none of the
project's verify or gc code): every enqueued prompt exactly once by source row, every
committed row's bytes where its row says with its sha256, then ``producer verify`` must pass
and a final ``producer gc`` dry run may list only losing or ended attempts' folders. The exit
code is non-zero when an invariant fails; the result (timeline, verdict, extra work) is
written to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from botocore.config import Config  # noqa: E402

from bench.harness import machine  # noqa: E402
from bench.slow_s3 import SlowStorage  # noqa: E402
from fewstep import services  # noqa: E402

BUCKET = "fewstep-chaos"
KINDS = ("kill", "pause", "redis", "storage", "slow", "skew")
OPS = ("gc", "reconcile", "retry")
#: Faults of each kind per 1,000 s of schedule (at least one of each in any run).
RATE = {"kill": 22, "pause": 16, "redis": 12, "storage": 8, "slow": 22, "skew": 16}
#: Full-scale duration ranges in seconds (scaled down for short runs, see :func:`scale`).
LENGTH = {"pause": (20, 90), "redis": (5, 60), "storage": (5, 40), "slow": (10, 60)}
HOLD = (5, 30)  # how long the slow proxy holds each request
SKEW = (10, 60)  # clock offsets, either sign
BATCH_SIZES = (1, 2, 4)
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
PARTI = REPO.parent / "shared" / "data" / "PartiPrompts.tsv"
SHUTDOWN_GRACE = 10
SHARD_SIZE = 8
#: The big webdataset job of each round streams its tars in multipart uploads: parts of 5 MiB
#: (SeaweedFS, like AWS, refuses smaller parts but the last), so a shard of 14 uncompressed
#: 384x384 PNGs (about 6 MiB) is one full part and a last part.
PART_BYTES = 5 * 1024 * 1024
BIG = {"side": 384, "shard_size": 14, "shards": 2}


# --- the schedule: a pure function of the seed ----------------------------------------------------


@dataclass
class Fault:
    """One fault: when (seconds after the start), what, on what, for how long."""

    at: float
    kind: str
    target: str
    duration: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Op:
    """An operator command at ``at`` on the ``pick``-th job (modulo the jobs existing then)."""

    at: float
    kind: str
    pick: int


@dataclass
class Plan:
    seed: int
    duration: float
    workers: int
    scale: float
    slots: list[dict[str, Any]]  # per worker slot: batch size, initial clock offset
    faults: list[Fault]
    ops: list[Op]
    rate: float | None = None  # faults of every kind per 1,000 s (--rate); None: RATE per kind

    def describe(self) -> str:
        lines = [
            f"chaos plan: seed {self.seed}, {self.duration:.0f} s, {self.workers} workers, "
            f"lengths scaled x{self.scale:.2f}"
            + (f", {self.rate:g} faults of each kind per 1,000 s" if self.rate else "")
        ]
        for i, slot in enumerate(self.slots):
            lines.append(f"  slot w{i}: batch {slot['batch_size']}, clock {slot['skew']:+.0f} s")
        for f in self.faults:
            extra = " ".join(f"{k}={v}" for k, v in f.detail.items())
            lines.append(f"  {f.at:7.1f}s  {f.kind:<8} {f.target:<10} {f.duration:5.1f}s  {extra}".rstrip())
        counts = {k: sum(1 for f in self.faults if f.kind == k) for k in KINDS}
        lines.append(f"  faults: {sum(counts.values())} {counts}; operator commands: {len(self.ops)}")
        return "\n".join(lines)


def scale(duration: float) -> float:
    """Fault lengths are full-scale from a 10-minute run; shorter runs shrink them (min 0.3)."""
    return min(1.0, max(0.3, duration / 600))


def plan(seed: int, duration: float, workers: int = 6, rate: float | None = None) -> Plan:
    """The schedule of a run: a pure function of its arguments.

    ``rate`` (a dense soak) draws that many faults of every kind per 1,000 s. Outages of one
    kind never overlap, so a dense plan shortens them: Redis, storage and slow-storage windows
    to at most 0.4 of the gap between two of their kind (never below the shortest of their
    range, 5 s and 10 s), pauses to at most the longer of 20 s and 1.5 gaps."""
    rng = random.Random(seed)
    s = scale(duration)
    slots = [
        {"batch_size": BATCH_SIZES[i % len(BATCH_SIZES)], "skew": 0.0 if i % 2 == 0 else _offset(rng)}
        for i in range(workers)
    ]
    start, end = 0.05 * duration, 0.9 * duration
    faults: list[Fault] = []
    for kind in KINDS:
        n = max(1, round(duration * (rate or RATE[kind]) / 1000))
        slot = (end - start) / n
        for j in range(n):
            length, detail = 0.0, {}
            if kind in LENGTH:
                lo, hi = LENGTH[kind]
                drawn = round(rng.uniform(lo, hi) * s, 1)
                if rate and kind == "pause":  # pauses of different workers may overlap
                    length = round(min(drawn, max(lo * s, 1.5 * slot)), 1)
                elif rate:
                    length = round(min(drawn, max(lo * s, 0.4 * slot), 0.9 * slot), 1)
                else:
                    length = min(drawn, round(0.9 * slot, 1))
            if kind == "slow":
                detail["hold"] = round(min(rng.uniform(*HOLD) * s, length), 1)
            if kind == "skew":
                detail["offset"] = _offset(rng)
            at = round(start + j * slot + rng.uniform(0, max(0.0, slot - length)), 1)
            target = {"redis": "redis", "storage": "seaweedfs", "slow": "s3-proxy"}.get(kind)
            faults.append(Fault(at, kind, target or f"w{rng.randrange(workers)}", length, detail))
    faults.sort(key=lambda f: (f.at, f.kind))
    ops, t = [], 2.0
    while t < duration:
        ops.append(Op(round(t, 1), rng.choice(OPS), rng.randrange(1000)))
        t += rng.uniform(4, 10)
    return Plan(seed, duration, workers, s, slots, faults, ops, rate)


def _offset(rng: random.Random) -> float:
    return float(rng.choice((-1, 1)) * rng.randint(*SKEW))


# --- the fleet ---------------------------------------------------------------------------------------


class Timeline:
    """What happened, with times since the start, printed as it goes."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.start

    def add(self, kind: str, target: str, duration: float | None = None, **detail: Any) -> dict[str, Any]:
        event = {"t": round(self.now(), 1), "kind": kind, "target": target, "duration": duration, **detail}
        with self._lock:
            self.events.append(event)
        print(_format_event(event), flush=True)
        return event


def _format_event(e: dict[str, Any]) -> str:
    extra = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("t", "kind", "target", "duration"))
    length = "" if e.get("duration") is None else f" {e['duration']:.1f}s"
    return f"[{e['t']:7.1f}s] {e['kind']:<10} {e['target']:<10}{length} {extra}".rstrip()


class Fleet:
    """Services, the slow proxy and the worker slots of a run."""

    def __init__(self, root: Path, plan_: Plan, timeline: Timeline):
        self.root, self.plan, self.timeline = root, plan_, timeline
        self.svc = services.start(root / "services", [BUCKET], appendonly=True)
        # The project's config with parts of PART_BYTES, so the big job's tars are multipart.
        config = root / "config"
        shutil.copytree(REPO / "config", config)
        defaults = (config / "defaults.toml").read_text()
        changed = re.sub(r"(?m)^part_bytes = \d+$", f"part_bytes = {PART_BYTES}", defaults)
        assert changed != defaults, "config/defaults.toml has no part_bytes line"
        (config / "defaults.toml").write_text(changed)
        self.proxy = SlowStorage(self.svc.s3_port).__enter__()
        self.faketime = Path(LIBFAKETIME).is_file()
        self.hub = root / "scorer-hub"
        self.env = {
            **os.environ,
            "CELERY_BROKER_URL": self.svc.broker_url,
            "AWS_ACCESS_KEY_ID": self.svc.access_key,
            "AWS_SECRET_ACCESS_KEY": self.svc.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.svc.s3_endpoint,  # operators: storage directly
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(self.hub),
            "FEWSTEP_MODEL_CACHE": str(root / "models"),
            "FEWSTEP_QUEUE_PREFIX": "chaos",
            "FEWSTEP_CONFIG_DIR": str(config),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        self.slots: list[subprocess.Popen | None] = [None] * plan_.workers
        self.skews = [slot["skew"] for slot in plan_.slots]
        self.deaths: dict[int, tuple[float, float]] = {}  # pid -> (wall time of death, its clock offset)
        self.pid_skew: dict[int, float] = {}
        self.stopping = False
        self._lock = threading.Lock()
        self._count = 0

    # workers
    def start_worker(self, i: int) -> subprocess.Popen:
        env = {**self.env, "AWS_ENDPOINT_URL_S3": self.proxy.url}
        skew = self.skews[i] if self.faketime else 0.0
        if skew:
            # Monotonic clocks are offset too (constant, so harmless): libfaketime 0.9.10 with
            # FAKETIME_DONT_FAKE_MONOTONIC=1 makes time.sleep() fail with EINVAL under a
            # negative offset, which would kill the worker for a reason no real host has.
            env.update(LD_PRELOAD=LIBFAKETIME, FAKETIME=f"{skew:+.0f}s")
        with self._lock:
            self._count += 1
            log = self.root / "logs" / f"w{i}-{self._count}.log"
        log.parent.mkdir(exist_ok=True)
        args = [sys.executable, "-m", "worker", "--model", "tiny", "--device", "cpu",
                "--batch-size", str(self.plan.slots[i]["batch_size"]), "--encode-threads", "1",
                "--shutdown-grace", str(SHUTDOWN_GRACE)]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )
        proc.log = log  # type: ignore[attr-defined]
        self.slots[i] = proc
        self.pid_skew[proc.pid] = skew
        return proc

    def kill(self, i: int) -> int | None:
        proc = self.slots[i]
        if proc is None or proc.poll() is not None:
            return None
        proc.kill()
        self.deaths[proc.pid] = (time.time(), self.pid_skew.get(proc.pid, 0.0))
        proc.wait()
        return proc.pid

    def pause(self, i: int) -> int | None:
        proc = self.slots[i]
        if proc is None or proc.poll() is not None:
            return None
        os.kill(proc.pid, signal.SIGSTOP)
        return proc.pid

    def resume(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def restart_gracefully(self, i: int) -> int | None:
        """SIGTERM the slot's worker (it drains in the background) and start a new one at once."""
        proc = self.slots[i]
        old = None
        if proc is not None and proc.poll() is None:
            old = proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
            threading.Thread(target=self._reap, args=(proc,), daemon=True).start()
        self.start_worker(i)
        return old

    def _reap(self, proc: subprocess.Popen) -> None:
        try:
            proc.wait(timeout=SHUTDOWN_GRACE + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.timeline.add("hung", f"pid {proc.pid}", note="SIGTERM not obeyed; SIGKILLed")
        self.deaths[proc.pid] = (time.time(), self.pid_skew.get(proc.pid, 0.0))

    def keep_full(self) -> None:
        """A worker that exited by itself is recorded and replaced (the fleet keeps its size)."""
        for i, proc in enumerate(self.slots):
            if proc is not None and proc.poll() is not None and not self.stopping:
                self.deaths.setdefault(proc.pid, (time.time(), self.pid_skew.get(proc.pid, 0.0)))
                self.timeline.add("exited", f"w{i}", code=proc.returncode, log=proc.log.name)
                self.start_worker(i)

    def stop_workers(self) -> dict[int, int | None]:
        self.stopping = True
        for proc in self.slots:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.terminate()
        codes = {}
        for proc in self.slots:
            if proc is None:
                continue
            try:
                codes[proc.pid] = proc.wait(timeout=SHUTDOWN_GRACE + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[proc.pid] = None
            self.deaths.setdefault(proc.pid, (time.time(), self.pid_skew.get(proc.pid, 0.0)))
        return codes

    def close(self) -> None:
        self.stopping = True
        for proc in self.slots:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()
        self.proxy.__exit__(None, None, None)
        self.svc.stop()

    def s3(self):
        return boto3.client(
            "s3",
            endpoint_url=self.svc.s3_endpoint,
            aws_access_key_id=self.svc.access_key,
            aws_secret_access_key=self.svc.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 10, "mode": "standard"}, s3={"addressing_style": "path"}),
        )


def producer(env: dict[str, str], *args: str, timeout: float = 180) -> tuple[int, dict[str, Any] | None, str]:
    """Run ``python -m producer ARGS --json``: (exit code, parsed JSON or None, stderr tail)."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "producer", *args, "--json"],
            env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, None, f"timed out after {timeout:.0f}s"
    summary = None
    with contextlib.suppress(ValueError):
        summary = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    return result.returncode, summary, result.stderr.strip()[-300:]


# --- jobs ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    layout: str
    prompts: list[str]  # by source row, as enqueued
    shards: int = 0
    scored: bool = False
    conditioned: bool = False
    complete: bool = False
    side: int = 64  # width and height
    shard_size: int = SHARD_SIZE
    png_level: int | None = None

    @property
    def url(self) -> str:
        return f"s3://{BUCKET}/chaos/{self.name}"


def read_prompts(rng: random.Random, count: int) -> list[str]:
    """``count`` prompts: PartiPrompts rows when the file is here, else generated ones."""
    if PARTI.is_file():
        rows = [line.split("\t")[0] for line in PARTI.read_text().splitlines()[1:]]
        rows = [r for r in rows if r.strip() and "\r" not in r]
        return [rows[rng.randrange(len(rows))] for _ in range(count)]
    return [f"a chaos prompt number {rng.randrange(10**6)}" for _ in range(count)]


def conditioning_images(directory: Path, count: int, rng: random.Random) -> list[Path]:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"photo-{i}.png"
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (80, 64), colour).save(path)
        paths.append(path)
    return paths


def enqueue_round(
    fleet: Fleet, number: int, rng: random.Random, size: int, timeline: Timeline, add, stop: threading.Event
) -> None:
    """One round of jobs: files, webdataset, parquet (scored, with embeddings), conditioned; each
    is handed to ``add`` once enqueued; none is started once ``stop`` is set."""
    jobs = [
        Job(f"r{number}-files", "files", read_prompts(rng, size)),
        Job(f"r{number}-tar", "webdataset", read_prompts(rng, size)),
        Job(f"r{number}-parquet", "parquet", read_prompts(rng, size), scored=True),
        Job(f"r{number}-cond", "files", read_prompts(rng, max(4, size // 2)), conditioned=True),
        Job(
            f"r{number}-big",
            "webdataset",
            read_prompts(rng, BIG["shard_size"] * BIG["shards"]),
            side=BIG["side"],
            shard_size=BIG["shard_size"],
            png_level=0,
        ),
    ]
    inputs = fleet.root / "inputs"
    inputs.mkdir(exist_ok=True)
    common = ["--model", "tiny", "--output", f"s3://{BUCKET}/chaos"]
    for job in jobs:
        if stop.is_set():
            return
        if job.conditioned:
            photos = conditioning_images(inputs / job.name, len(job.prompts), rng)
            path = inputs / f"{job.name}.csv"
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["prompt", "image"])
                writer.writerows(zip(job.prompts, map(str, photos), strict=True))
            args = ["enqueue", "file", str(path), "--column", "prompt", "--image-column", "image"]
        else:
            path = inputs / f"{job.name}.tsv"
            path.write_text(
                "Prompt\tCategory\tChallenge\tNote\n" + "".join(f"{p}\tc\tb\t\n" for p in job.prompts)
            )
            args = ["enqueue", "partiprompts", "--path", str(path)]
        args += ["--job", job.name, "--layout", job.layout, *common, "--shard-size", str(job.shard_size)]
        args += ["--width", str(job.side), "--height", str(job.side)]
        if job.png_level is not None:
            args += ["--png-level", str(job.png_level)]
        if job.scored:
            args += ["--score", "clip", "--embeddings"]
        for _ in range(30):  # Redis or storage may be down right now
            code, summary, err = producer(fleet.env, *args)
            if code == 0 and summary:
                job.shards = int(summary["shards"])
                break
            time.sleep(2)
        else:
            raise SystemExit(f"enqueue of {job.name} kept failing: {err}")
        add(job)
        timeline.add("enqueue", job.name, layout=job.layout, prompts=len(job.prompts), shards=job.shards)


# --- watching heartbeats: how much losing attempts did ---------------------------------------------


class HeartbeatWatch:
    """Polls the open jobs' worker heartbeats and attempt folders (storage, directly) and keeps,
    per attempt id, the most images it was seen to have uploaded: a lower bound on the work of
    attempts that lose (gc may delete their folders later; a heartbeat comes every 5 s)."""

    def __init__(self, fleet: Fleet, jobs: list[Job], every: float = 2.0):
        self.fleet, self.jobs, self.every = fleet, jobs, every
        self.uploaded: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        s3 = self.fleet.s3()
        while not self._stop.wait(self.every):
            for job in [j for j in self.jobs if not j.complete]:
                with contextlib.suppress(Exception):
                    for key, _ in list_keys(s3, f"chaos/{job.name}/workers/"):
                        beat = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
                        attempt, done = beat.get("attempt_id"), beat.get("shard_images_uploaded")
                        if attempt and isinstance(done, int):
                            self.uploaded[attempt] = max(done, self.uploaded.get(attempt, 0))
                    if job.layout == "files":
                        for attempt, n in image_folders(s3, job).items():
                            self.uploaded[attempt] = max(n, self.uploaded.get(attempt, 0))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def image_folders(s3, job: Job) -> dict[str, int]:
    """Images (not control maps) per attempt folder of a files-layout job."""
    folders: dict[str, int] = {}
    for key, _ in list_keys(s3, f"chaos/{job.name}/images/"):
        parts = key.split("/")
        if len(parts) == 6 and ".control." not in parts[5]:
            folders[parts[4]] = folders.get(parts[4], 0) + 1
    return folders


def list_keys(s3, prefix: str) -> list[tuple[str, int]]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
    return keys


# --- faults --------------------------------------------------------------------------------------------


class Injector:
    """Fires the plan's faults and operator commands at their times."""

    def __init__(self, fleet: Fleet, plan_: Plan, jobs: list[Job], timeline: Timeline):
        self.fleet, self.plan, self.jobs, self.timeline = fleet, plan_, jobs, timeline
        self.threads: list[threading.Thread] = []
        self.injected: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.ops: dict[str, dict[str, int]] = {k: {"ran": 0, "failed": 0, "skipped": 0} for k in OPS}
        self.op_results: list[dict[str, Any]] = []
        self._pending: list[tuple[Op, Job]] = []  # at most one per kind, run in order by one operator
        self._op_wake = threading.Condition()
        self._op_stop = False
        self._operator = threading.Thread(target=self._operate, daemon=True)
        self._operator.start()
        self._svc_lock = threading.Lock()

    def fire(self, fault: Fault) -> None:
        t = threading.Thread(target=self._fault, args=(fault,), daemon=True)
        t.start()
        self.threads.append(t)

    def _fault(self, f: Fault) -> None:
        fleet, tl = self.fleet, self.timeline
        i = int(f.target[1:]) if f.target.startswith("w") else -1
        if f.kind == "kill":
            pid = fleet.kill(i)
            if pid is None:
                tl.add("kill", f.target, note="no live worker in the slot; skipped")
                return
            fleet.start_worker(i)
            self.injected["kill"] += 1
            tl.add("kill", f.target, pid=pid, note="SIGKILL; a new worker takes the slot")
        elif f.kind == "pause":
            pid = fleet.pause(i)
            if pid is None:
                tl.add("pause", f.target, note="no live worker in the slot; skipped")
                return
            self.injected["pause"] += 1
            tl.add("pause", f.target, f.duration, pid=pid)
            time.sleep(f.duration)
            fleet.resume(pid)
            tl.add("resume", f.target, pid=pid)
        elif f.kind in ("redis", "storage"):
            with self._svc_lock:  # one service at a time is restarted
                svc = fleet.svc
                stop, start = (
                    (svc.stop_redis, lambda: svc.start_redis(appendonly=True))
                    if f.kind == "redis"
                    else (svc.stop_weed, svc.start_weed)
                )
                stop()
                self.injected[f.kind] += 1
                tl.add("down", f.target, f.duration)
                time.sleep(f.duration)
                began = time.monotonic()
                start()
                tl.add("up", f.target, restart_s=round(time.monotonic() - began, 1))
        elif f.kind == "slow":
            fleet.proxy.slow_down(f.duration, f.detail["hold"])
            self.injected["slow"] += 1
            before = dict(fleet.proxy.held)
            tl.add("slow", f.target, f.duration, hold=f.detail["hold"])
            time.sleep(f.duration)
            fleet.proxy.normal()
            held = {k: fleet.proxy.held[k] - before[k] for k in before}
            tl.add("fast", f.target, held=held)
        elif f.kind == "skew":
            if not fleet.faketime:
                tl.add(
                    "skew", f.target, note=f"skipped: {LIBFAKETIME} not installed (apt-get install faketime)"
                )
                return
            fleet.skews[i] = f.detail["offset"]
            old = fleet.restart_gracefully(i)
            self.injected["skew"] += 1
            tl.add("skew", f.target, offset=f.detail["offset"], replaced=old)

    def op(self, o: Op) -> None:
        """Queue an operator command; one of a kind already waiting makes this one a skip."""
        # Operators act on the jobs still running (that is where a wrong deletion would land).
        jobs = [j for j in self.jobs if j.shards and not j.complete] or [j for j in self.jobs if j.shards]
        if not jobs:
            return
        with self._op_wake:
            if any(p.kind == o.kind for p, _ in self._pending):
                self.ops[o.kind]["skipped"] += 1
                return
            self._pending.append((o, jobs[o.pick % len(jobs)]))
            self._op_wake.notify()

    def _operate(self) -> None:
        while True:
            with self._op_wake:
                while not self._pending and not self._op_stop:
                    self._op_wake.wait()
                if not self._pending:
                    return
                o, job = self._pending[0]
            self._op(o, job)
            with self._op_wake:
                self._pending.pop(0)
                self._op_wake.notify_all()

    def _op(self, o: Op, job: Job) -> None:
        out = f"s3://{BUCKET}/chaos"
        args = {
            "gc": ("gc", job.name, "--output", out, "--delete", "--abandoned-after", "1"),
            "reconcile": ("reconcile", job.name, "--output", out, "--abandoned-after", "1"),
            "retry": ("retry", job.name, "--output", out, "--failed"),
        }[o.kind]
        at = self.timeline.now()
        code, summary, err = producer(self.fleet.env, *args, timeout=120)
        self.ops[o.kind]["ran"] += 1
        if code != 0:
            self.ops[o.kind]["failed"] += 1
        brief = _op_brief(o.kind, summary)
        self.op_results.append({"t": round(at, 1), "op": o.kind, "job": job.name, "code": code, **brief})
        error = {"error": err[-120:]} if code else {}
        self.timeline.add(o.kind, job.name, round(self.timeline.now() - at, 1), code=code, **brief, **error)

    def join(self) -> None:
        """Wait for the faults' ends and the operator commands still queued."""
        for t in self.threads:
            t.join()
        with self._op_wake:
            self._op_stop = True
            self._op_wake.notify_all()
        self._operator.join()


def _op_brief(kind: str, summary: dict[str, Any] | None) -> dict[str, Any]:
    if not summary:
        return {}
    if kind == "gc":
        return {"deleted_objects": summary.get("objects", 0)}
    if kind == "reconcile":
        keys = ("enqueued", "restored_from_dead_workers", "aborted_uploads")
        return {k: summary[k] for k in keys if summary.get(k)}
    return {"retried": len(summary.get("retried", []))}


# --- the checker ---------------------------------------------------------------------------------------

_ATTEMPT_FOLDER = re.compile(r"^(?:images|embeddings)/part-(\d+)/([^/]+?)(?:/[^/]+|\.tar|\.parquet)$")


def check(fleet: Fleet, jobs: list[Job]) -> dict[str, Any]:
    """Judge every job from storage alone: prompts, bytes, hashes, attempt folders."""
    verdict: dict[str, Any] = {"jobs": {}, "lost": 0, "duplicated": 0, "wrong_prompt": 0, "mismatches": 0,
                               "missing_objects": 0, "mixed_attempts": 0, "open_shards": 0,
                               "failed_markers": 0, "missing_embeddings": 0, "rows": 0}  # fmt: skip
    local = threading.local()

    def judge(job: Job) -> dict[str, Any]:
        if not hasattr(local, "s3"):
            local.s3 = fleet.s3()
        return _check_job(local.s3, job)

    for name, r in per_job(jobs, judge, threads=4).items():
        verdict["jobs"][name] = r
        for key in ("lost", "duplicated", "wrong_prompt", "mismatches", "missing_objects", "mixed_attempts",
                    "open_shards", "failed_markers", "missing_embeddings", "rows"):  # fmt: skip
            verdict[key] += r[key]
    return verdict


def unfinished_uploads(s3) -> int:
    """Unfinished multipart uploads in the bucket, listed directly (boto3, every page)."""
    count, args = 0, {"Bucket": BUCKET}
    while True:
        page = s3.list_multipart_uploads(**args)
        count += len(page.get("Uploads", []))
        if not page.get("IsTruncated"):
            return count
        args.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])


def _get(s3, key: str) -> bytes | None:
    try:
        return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


def _check_job(s3, job: Job) -> dict[str, Any]:
    base = f"chaos/{job.name}/"
    markers = {
        int(m.group(1)): key
        for key, _ in list_keys(s3, base + "metadata/")
        if (m := re.search(r"metadata/part-(\d+)\.parquet$", key))
    }
    r: dict[str, Any] = {"shards": job.shards, "committed": len(markers), "problems": []}
    r |= dict.fromkeys(("rows", "lost", "duplicated", "wrong_prompt", "mismatches", "missing_objects",
                        "mixed_attempts", "missing_embeddings"), 0)  # fmt: skip
    r["open_shards"] = len(set(range(1, job.shards + 1)) - set(markers))
    r["failed_markers"] = len(list_keys(s3, base + "failed/"))
    seen: dict[int, int] = {}
    committed: dict[int, str] = {}
    containers: dict[str, bytes | None] = {}
    for shard, key in sorted(markers.items()):
        table = pq.read_table(io.BytesIO(_get(s3, key) or b""))
        rows = table.to_pylist()
        attempts = {row["attempt_id"] for row in rows}
        if len(attempts) != 1:
            r["mixed_attempts"] += 1
            r["problems"].append(f"part {shard}: rows of {len(attempts)} attempts")
        attempt = rows[0]["attempt_id"] if rows else ""
        committed[shard] = attempt
        for row in rows:
            source = row["source_row"]
            seen[source] = seen.get(source, 0) + 1
            if not (0 <= source < len(job.prompts)) or row["prompt"] != job.prompts[source]:
                r["wrong_prompt"] += 1
                r["problems"].append(f"part {shard}: source row {source} has another prompt")
            data = _image_bytes(s3, base, row, job.layout, containers)
            folder = _ATTEMPT_FOLDER.match(row["image_key"] or "")
            if not folder or (int(folder.group(1)), folder.group(2)) != (shard, row["attempt_id"]):
                r["problems"].append(f"part {shard}: {row['image_key']} outside its attempt's folder")
                r["mismatches"] += 1
            if data is None:
                r["missing_objects"] += 1
                r["problems"].append(f"part {shard}: {row['image_key']} missing")
            elif hashlib.sha256(data).hexdigest() != row["sha256"] or len(data) != row["bytes"]:
                r["mismatches"] += 1
                r["problems"].append(
                    f"part {shard}: {row['image_key']} row {row['row_id']}: sha256/size differ"
                )
        if job.scored:
            emb = _get(s3, f"{base}embeddings/part-{shard:06d}/{attempt}.parquet")
            ids = pq.read_table(io.BytesIO(emb)).column("row_id").to_pylist() if emb else None
            if ids != [row["row_id"] for row in rows]:
                r["missing_embeddings"] += 1
                r["problems"].append(f"part {shard}: embeddings of attempt {attempt} missing or other rows")
            if any(row["clip_score"] is None for row in rows):
                r["problems"].append(f"part {shard}: rows without clip_score")
                r["mismatches"] += 1
    r["rows"] = sum(seen.values())
    r["lost"] = sum(1 for i in range(len(job.prompts)) if i not in seen)
    r["duplicated"] = sum(n - 1 for n in seen.values() if n > 1)
    # Every object under images/ and embeddings/ lies in an attempt folder; which are losers'.
    losers: dict[tuple[int, str], int] = {}
    for prefix in ("images/", "embeddings/"):
        for key, _ in list_keys(s3, base + prefix):
            m = _ATTEMPT_FOLDER.match(key[len(base) :])
            if not m:
                r["problems"].append(f"{key}: outside any attempt folder")
                continue
            owner = (int(m.group(1)), m.group(2))
            if committed.get(owner[0]) != owner[1]:
                losers[owner] = losers.get(owner, 0) + 1
    r["committed_attempts"] = committed
    r["loser_folders"] = {f"{s}/{a}": n for (s, a), n in sorted(losers.items())}
    r["problems"] = r["problems"][:20]
    return r


def _image_bytes(
    s3, base: str, row: dict[str, Any], layout: str, cache: dict[str, bytes | None]
) -> bytes | None:
    key = base + row["image_key"]
    if layout == "files":
        return _get(s3, key)
    if key not in cache:
        cache.clear()  # one shard's container at a time
        cache[key] = _get(s3, key)
    data = cache[key]
    if data is None:
        return None
    if layout == "webdataset":
        offset = row["image_offset"]
        return data[offset : offset + row["bytes"]]
    table = pq.read_table(io.BytesIO(data), columns=["image"])
    return table.column("image")[row["image_row"]].as_py()["bytes"]


def extra_work(
    fleet: Fleet, jobs: list[Job], verdict: dict[str, Any], uploaded: dict[str, int]
) -> dict[str, Any]:
    """Attempts beyond one per shard and what the attempts that did not commit cost."""
    s3 = fleet.s3()
    states: dict[str, int] = {}
    attempts = shards = 0
    lost_images = 0
    loser_wall = 0.0
    unbounded = 0
    committed_gen = 0.0
    wasted_gen = 0.0
    for job in jobs:
        committed = verdict["jobs"][job.name]["committed_attempts"]
        shards += job.shards
        gen = images = 0.0
        for key, _ in list_keys(s3, f"chaos/{job.name}/stats/"):
            stats = json.loads(_get(s3, key) or b"{}")
            gen += float(stats.get("generate_s", 0))
            images += float(stats.get("images", 0))
        committed_gen += gen
        per_image = gen / images if images else 0.0
        for key, _ in list_keys(s3, f"chaos/{job.name}/attempts/"):
            record = json.loads(_get(s3, key) or b"{}")
            state = record.get("state", "?")
            if state == "retry_requested":
                continue
            attempts += 1
            states[state] = states.get(state, 0) + 1
            if committed.get(record.get("shard")) == record.get("id"):
                continue
            done = uploaded.get(record.get("id", ""), 0)
            lost_images += done
            wasted_gen += done * per_image
            start, end = _time(record.get("started_at")), _time(record.get("ended_at"))
            if end is None:  # still "running": its process died (killed, stopped) or it ran on
                pid = _pid(record.get("worker"))
                if pid in fleet.deaths:
                    died, skew = fleet.deaths[pid]
                    end = died + skew
            if start is not None and end is not None:
                loser_wall += max(0.0, end - start)
            else:
                unbounded += 1
    return {
        "shards": shards,
        "attempts": attempts,
        "extra_attempts": attempts - shards,
        "extra_attempts_pct": round(100 * (attempts - shards) / shards, 1) if shards else 0.0,
        "attempt_states": states,
        "loser_images_uploaded_seen": lost_images,
        "committed_generate_s": round(committed_gen, 1),
        "generate_s_spent_twice": round(wasted_gen, 1),
        "extra_work_pct": round(100 * wasted_gen / committed_gen, 1) if committed_gen else 0.0,
        "loser_attempt_wall_s": round(loser_wall, 1),
        "loser_attempts_without_end": unbounded,
        "counted": (
            "attempts: attempt records other than retry_requested; extra = attempts - shards. "
            "generate_s_spent_twice: images that attempts which did not commit were seen to have "
            "uploaded (their heartbeats' shard_images_uploaded, and files-layout attempt folders "
            "listed every 2 s; a lower bound) times the job's committed generate_s per image "
            "(stats/part-N.json); extra_work_pct is that over the committed generate_s. "
            "loser_attempt_wall_s: start to end of those attempts on their worker's clock (end: "
            "the record's ended_at, or when the harness saw the process die), an upper bound "
            "that includes waits, pauses and outages."
        ),
    }


def _time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    with contextlib.suppress(ValueError):
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _pid(worker: Any) -> int | None:
    parts = str(worker).split(":")
    return int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None


# --- the run -------------------------------------------------------------------------------------------


def wait_ready(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(" ready." in p.log.read_text(errors="replace") for p in procs):  # type: ignore[attr-defined]
            return
        for p in procs:
            if p.poll() is not None:
                log = p.log  # type: ignore[attr-defined]
                raise SystemExit(f"worker exited with {p.returncode} before it was ready, see {log}")
        time.sleep(1)
    raise SystemExit(f"workers not ready within {timeout:.0f}s")


def open_shards(s3, jobs: list[Job]) -> int:
    """Shards without a commit marker, over the jobs (a job found complete is not listed again)."""
    total = 0
    for job in list(jobs):
        if job.complete:
            continue
        try:
            committed = len(list_keys(s3, f"chaos/{job.name}/metadata/"))
        except Exception:
            committed = 0  # storage down: count it open
        job.complete = committed >= job.shards
        total += job.shards - committed
    return total


class Enqueuer:
    """Enqueues a new round of jobs whenever the fleet is about to run out of work, until 75 %
    of the schedule has passed (in the background: an enqueue takes seconds and must not delay
    the faults)."""

    def __init__(self, fleet: Fleet, jobs: list[Job], size: int, timeline: Timeline, seed: int):
        self.fleet, self.jobs, self.size, self.timeline = fleet, jobs, size, timeline
        self.rng = random.Random(f"{seed}-jobs")
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def round(self) -> None:
        self.rounds += 1
        enqueue_round(
            self.fleet, self.rounds, self.rng, self.size, self.timeline, self.jobs.append, self._stop
        )

    def start(self, until: float) -> None:
        self.until = until
        self._thread.start()

    def _run(self) -> None:
        s3 = self.fleet.s3()
        while not self._stop.wait(3):
            if self.timeline.now() >= self.until:
                return
            if open_shards(s3, self.jobs) < 2 * self.fleet.plan.workers:
                self.round()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def per_job(jobs: list[Job], command, threads: int = 3) -> dict[str, Any]:
    """``command(job)`` for every job, ``threads`` at a time (a CLI is a process start)."""
    with ThreadPoolExecutor(threads) as pool:
        return dict(zip([j.name for j in jobs], pool.map(command, jobs), strict=True))


def run(
    seed: int, duration: float, workers: int, out: Path, round_size: int, finish_timeout: float,
    rate: float | None = None,
) -> int:  # fmt: skip
    the_plan = plan(seed, duration, workers, rate)
    print(f"seed {seed}", flush=True)
    print(the_plan.describe(), flush=True)
    if not Path(LIBFAKETIME).is_file():
        print(f"clock skew faults skipped: {LIBFAKETIME} not found (apt-get install faketime)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="fewstep-chaos-"))
    timeline = Timeline()
    result: dict[str, Any] = {
        "seed": seed, "duration": duration, "workers": workers, "round_size": round_size, "rate": rate,
        "machine": machine(), "plan": asdict(the_plan), "started": dt.datetime.now(dt.UTC).isoformat(),
        "failures": ["the run did not reach its end"],
    }  # fmt: skip
    fleet = Fleet(root, the_plan, timeline)
    watch = enqueuer = None
    output = f"s3://{BUCKET}/chaos"
    try:
        from tests.replicas import scorers as replicas

        replicas.build(fleet.hub)
        # All at once: the tiny model's build is atomic (a scratch folder renamed), so racing
        # builds are harmless. The first round is enqueued while they load.
        starting = [fleet.start_worker(i) for i in range(workers)]
        jobs: list[Job] = []
        enqueuer = Enqueuer(fleet, jobs, round_size, timeline, seed)
        enqueuer.round()
        wait_ready(starting, 900)
        timeline.start = time.monotonic()
        timeline.add("start", "fleet", workers=workers, seed=seed)
        enqueuer.start(until=0.75 * duration)
        watch = HeartbeatWatch(fleet, jobs)
        injector = Injector(fleet, the_plan, jobs, timeline)
        faults, ops = list(the_plan.faults), list(the_plan.ops)
        next_check = 0.0
        while timeline.now() < duration:
            now = timeline.now()
            while faults and faults[0].at <= now:
                injector.fire(faults.pop(0))
            while ops and ops[0].at <= now:
                injector.op(ops.pop(0))
            if now >= next_check:
                next_check = now + 2
                fleet.keep_full()
            time.sleep(0.1)
        enqueuer.stop()
        injector.join()
        fleet.proxy.normal()
        timeline.add("faults-end", "fleet", injected=injector.injected)

        # Finish: reconcile and retry the open jobs until every job is complete, within a bound.
        s3 = fleet.s3()
        deadline = time.monotonic() + finish_timeout
        finished = False
        next_nudge = time.monotonic() + 20  # the fleet first finishes what it holds
        while time.monotonic() < deadline:
            fleet.keep_full()
            if open_shards(s3, jobs) == 0:
                finished = True
                break
            if time.monotonic() >= next_nudge:
                open_jobs = [j for j in jobs if not j.complete]
                done = per_job(open_jobs, lambda j: (
                    producer(fleet.env, "reconcile", j.name, "--output", output),
                    producer(fleet.env, "retry", j.name, "--output", output, "--failed"),
                ))  # fmt: skip
                sent = {
                    n: (_op_brief("reconcile", r[1]), _op_brief("retry", f[1])) for n, (r, f) in done.items()
                }
                timeline.add("nudge", "open jobs", sent=sent)
                next_nudge = time.monotonic() + 20
            time.sleep(2)
        timeline.add("finished" if finished else "unfinished", "fleet", open_shards=open_shards(s3, jobs))
        codes = fleet.stop_workers()
        timeline.add("stopped", "fleet", exit_codes=sorted(set(map(str, codes.values()))))
        watch.stop()

        # Judge.
        verdict = check(fleet, jobs)
        verify = per_job(jobs, lambda j: producer(fleet.env, "verify", j.name, "--output", output))
        verify = {
            n: {"code": c, "ok": bool(sm and sm.get("ok")), "error": e[-200:]}
            for n, (c, sm, e) in verify.items()
        }

        def gc_dry_run(job: Job) -> dict[str, Any]:
            code, summary, _ = producer(fleet.env, "gc", job.name, "--output", output)
            committed = verdict["jobs"][job.name]["committed_attempts"]
            listed = [(f["shard"], f["attempt"]) for f in (summary or {}).get("folders", [])]
            return {
                "code": code,
                "folders": len(listed),
                "objects": (summary or {}).get("objects"),
                "committed_listed": sum(1 for s, a in listed if committed.get(s) == a),
                "open_kept": (summary or {}).get("kept_open_objects"),
                "loser_folders_seen_by_checker": len(verdict["jobs"][job.name]["loser_folders"]),
            }

        gc_left = per_job(jobs, gc_dry_run)
        work = extra_work(fleet, jobs, verdict, watch.uploaded)
        # The final gc --delete must leave every committed image where its row says.
        swept = [j for j in jobs if gc_left[j.name]["folders"]]
        per_job(swept, lambda j: producer(fleet.env, "gc", j.name, "--output", output, "--delete"))
        after = check(fleet, jobs)
        # Every shard is committed: the final reconcile may abort what is left of every upload.
        final = per_job(jobs, lambda j: producer(
            fleet.env, "reconcile", j.name, "--output", output, "--abandoned-after", "0"
        ))  # fmt: skip
        multipart = {
            "requests_through_proxy": dict(fleet.proxy.uploads),
            "aborted_by_reconcile_during_run": sum(r.get("aborted_uploads", 0) for r in injector.op_results),
            "aborted_by_final_reconcile": sum(
                (sm or {}).get("aborted_uploads", 0) for _, sm, _ in final.values()
            ),
            "unfinished_after_final_reconcile": unfinished_uploads(s3),
        }
        timeline.add("uploads", "storage", **multipart)
        failures = invariants(verdict, after, verify, gc_left, finished)
        if multipart["unfinished_after_final_reconcile"]:
            failures.append(f"unfinished multipart uploads after the final reconcile: {multipart}")
        result.update(
            finished=finished, jobs=[asdict(j) | {"prompts": len(j.prompts)} for j in jobs],
            injected=injector.injected, operator_commands=injector.ops, op_results=injector.op_results,
            worker_exit_codes=codes, verdict=verdict, after_final_gc=after | {"jobs": None},
            verify=verify, final_gc_dry_run=gc_left, extra_work=work, proxy_held=fleet.proxy.held,
            multipart=multipart,
            failures=failures, timeline=timeline.events, ended=dt.datetime.now(dt.UTC).isoformat(),
        )  # fmt: skip
    finally:
        for thing in (enqueuer, watch):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.stop()
        with contextlib.suppress(Exception):
            shutil.copytree(root / "logs", out / f"logs-seed{seed}", dirs_exist_ok=True)
        fleet.close()
        shutil.rmtree(root, ignore_errors=True)
        result.setdefault("timeline", timeline.events)
        (out / f"chaos-seed{seed}.json").write_text(json.dumps(result, indent=2, default=str))
    print_summary(result)
    return 1 if result["failures"] else 0


def invariants(verdict, after, verify, gc_left, finished) -> list[str]:
    """The invariants that failed, in words (empty: the run passed)."""
    failures = []
    if not finished:
        failures.append(f"jobs not complete at the end: {verdict['open_shards']} shards open")
    for key in ("lost", "duplicated", "wrong_prompt", "mismatches", "missing_objects", "mixed_attempts",
                "missing_embeddings", "failed_markers"):  # fmt: skip
        if verdict[key]:
            failures.append(f"{key}: {verdict[key]}")
        if after[key] and not verdict[key]:
            failures.append(f"after the final gc --delete, {key}: {after[key]}")
    bad = [name for name, v in verify.items() if not v["ok"]]
    if bad:
        failures.append(f"producer verify failed for {bad}")
    named = [name for name, g in gc_left.items() if g["committed_listed"] or g["code"] != 0]
    if named:
        failures.append(f"final gc dry run lists a committed attempt's folder (or failed) for {named}")
    return failures


def print_summary(result: dict[str, Any]) -> None:
    print("\nfault timeline:")
    for event in result.get("timeline", []):
        print("  " + _format_event(event))
    v = result.get("verdict", {})
    print(
        f"\nseed {result['seed']}: injected {result.get('injected')}; "
        f"operator commands {result.get('operator_commands')}"
    )
    print(
        f"prompts {v.get('rows')} committed; lost {v.get('lost')}, duplicated {v.get('duplicated')}, "
        f"mismatches {v.get('mismatches')}, missing objects {v.get('missing_objects')}"
    )
    print(f"extra work: {json.dumps(result.get('extra_work'))}")
    print(f"multipart uploads: {json.dumps(result.get('multipart'))}")
    if result.get("failures"):
        print("INVARIANTS FAILED:\n  " + "\n  ".join(result["failures"]))
    else:
        print("all invariants hold")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--duration", type=float, default=150, help="seconds of faults [150]")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument(
        "--rate", type=float, help="faults of every kind per 1,000 s, outages shortened to fit (a dense soak)"
    )
    parser.add_argument("--out", type=Path, default=Path("chaos-out"))
    parser.add_argument(
        "--round-size", type=int, help="prompts per job of a round [1.5 x the duration in s, 24 to 200]"
    )
    parser.add_argument("--finish-timeout", type=float, default=300, help="bound on the end phase [300 s]")
    parser.add_argument("--plan-only", action="store_true", help="print the schedule and exit")
    args = parser.parse_args(argv)
    # SIGTERM (a test's timeout, a CI cancel) ends the run through its clean-up: the fleet,
    # Redis and SeaweedFS are stopped, the timeline so far is written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.plan_only:
        print(plan(args.seed, args.duration, args.workers, args.rate).describe())
        return 0
    size = args.round_size or min(200, max(24, SHARD_SIZE * round(1.5 * args.duration / SHARD_SIZE)))
    return run(args.seed, args.duration, args.workers, args.out, size, args.finish_timeout, args.rate)


if __name__ == "__main__":
    sys.exit(main())
