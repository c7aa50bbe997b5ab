"""The state of a job and of the workers on it, read from storage.

Sources, all under the job's folder: commit markers (``metadata/``), failed markers
(``failed/``), per-shard timings (``stats/``) and worker heartbeats (``workers/``). Redis is
asked only how many shards still wait in the queue; when it cannot be reached the status is
complete but for that number, which is then unknown (``None``).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fewstep.contract import (
    FAILED,
    STATS,
    WORKERS,
    heartbeat_age,
    heartbeat_live,
    parse_time,
    part_name,
    shard_of_key,
    shard_rows,
)
from fewstep.queue import pending_messages, redis_client
from fewstep.settings import defaults, describe_error
from fewstep.storage import KeyMissing, Store
from producer.cost import cost_summary
from producer.progress import Progress, read_progress

# Job throughput from per-shard stats is measured over this window.
RATE_WINDOW_S = 300.0
# After Redis failed to answer, it is asked again only after this many seconds.
REDIS_RETRY_S = 30.0


def _load_json(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _failure(shard: int, marker: dict[str, Any]) -> dict[str, Any]:
    """A failed marker in one shape, whatever fields its writer used for the error."""
    error = marker.get("error", marker.get("last_error"))
    if isinstance(error, dict):
        error = error.get("error") or error.get("message") or json.dumps(error)
    return {
        "shard": shard,
        "part": part_name(shard),
        "error": str(error) if error is not None else "(no error recorded)",
        "attempts": marker.get("attempts", marker.get("attempt")),
        "worker": marker.get("worker"),
        "at": marker.get("failed_at") or marker.get("at") or marker.get("finished_at"),
    }


def _error_of_job(error: object, job_url: str | None) -> bool:
    """Whether a heartbeat's ``last_error`` is this job's: a worker writes its heartbeat to the
    job in progress, and its last error may come from another job (older workers did not say
    which, so an error that names no job is not shown)."""
    return isinstance(error, dict) and bool(job_url) and error.get("job_url") == job_url


@dataclass
class JobStatus:
    """One reading of a job: storage markers, stats, heartbeats and (maybe) the queue."""

    progress: Progress
    read_at: dt.datetime
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: dict[int, dict[str, Any]] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    pending: set[int] | None = None  # shards in Redis (waiting or delivered); None: unknown
    redis_error: str | None = None
    observed_rate: float | None = None  # images/s between successive readings (watch mode)
    quota: dict[str, Any] | None = None  # progress of the quota `producer topup` fills, if any
    gpu_price: float | None = None  # per GPU-hour, for the cost of kept images (producer.cost)

    @property
    def spec(self) -> dict[str, Any]:
        return self.progress.spec

    @property
    def live_workers(self) -> list[dict[str, Any]]:
        return [w for w in self.workers if w["live"]]

    @property
    def running(self) -> set[int]:
        """Shards a live worker says it is working on (and that are not committed yet)."""
        return {
            int(w["shard"])
            for w in self.live_workers
            if w.get("state") == "working" and isinstance(w.get("shard"), int)
        } - self.progress.committed

    @property
    def queued(self) -> set[int] | None:
        if self.pending is None:
            return None
        return self.pending - self.progress.committed - self.progress.failed - self.running

    @property
    def unqueued(self) -> set[int] | None:
        """Open shards neither in Redis nor running: lost from the queue (Redis flushed, or
        restarted empty); ``producer reconcile`` sends them again. None when Redis is unknown."""
        if self.pending is None:
            return None
        return set(self.progress.open_shards) - self.pending - self.running

    def rate(self) -> tuple[float | None, str | None]:
        """Current images/s of the job and where the figure comes from."""
        reported = [w["images_per_s"] for w in self.live_workers if w.get("state") == "working"]
        reported = [r for r in reported if isinstance(r, int | float)]
        if reported:
            return float(sum(reported)), "heartbeats"
        if self.observed_rate is not None:
            return self.observed_rate, "observed"
        created = parse_time(self.spec.get("created_at"))
        window = RATE_WINDOW_S
        if created:
            window = min(window, (self.read_at - created).total_seconds())
        if window > 0:
            horizon = self.read_at - dt.timedelta(seconds=window)
            recent = [
                s for s in self.stats.values() if (parse_time(s.get("finished_at")) or horizon) > horizon
            ]
            if recent:
                return sum(int(s.get("images") or 0) for s in recent) / window, "stats"
        return None, None

    def last_errors(self, limit: int = 5) -> list[dict[str, Any]]:
        """The newest errors: shards given up on, and workers' last errors."""
        errors = [
            {"source": "failed", **f} for f in self.failures.values() if f["shard"] in self.progress.failed
        ]
        for w in self.workers:
            e = w.get("last_error")
            if isinstance(e, dict) and e.get("error"):
                shard = e.get("shard")
                errors.append(
                    {
                        "source": "worker",
                        "shard": shard,
                        "part": part_name(shard) if isinstance(shard, int) and shard > 0 else None,
                        "error": str(e["error"]),
                        "worker": w.get("worker"),
                        "at": e.get("at"),
                    }
                )
        epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
        errors.sort(key=lambda e: parse_time(e.get("at")) or epoch, reverse=True)
        return errors[:limit]

    def stage_totals(self) -> dict[str, Any] | None:
        """Sums of the per-shard timings (generate / encode / upload) and the mean GPU-idle fraction."""
        if not self.stats:
            return None
        totals: dict[str, Any] = {"shards": len(self.stats)}
        for key in ("seconds", "generate_s", "encode_s", "upload_s"):
            values = [s[key] for s in self.stats.values() if isinstance(s.get(key), int | float)]
            totals[key] = round(sum(values), 3) if values else None
        idle = [
            (s["gpu_idle_fraction"], s.get("seconds") or 1.0)
            for s in self.stats.values()
            if isinstance(s.get("gpu_idle_fraction"), int | float)
        ]
        weight = sum(w for _f, w in idle)
        totals["gpu_idle_fraction"] = round(sum(f * w for f, w in idle) / weight, 4) if weight else None
        # What was idle: "GPU" when the shards ran on CUDA (worker ids are host:pid:device).
        devices = {str(s.get("worker") or "").split(":", 2)[-1] for s in self.stats.values()}
        totals["device"] = "GPU" if all(d.startswith("cuda") for d in devices) else "device"
        return totals

    def summary(self) -> dict[str, Any]:
        """Everything as one JSON-ready object (the keys of the plain progress summary first)."""
        p = self.progress
        rate, source = self.rate()
        remaining = sum(shard_rows(p.spec, s) for s in p.open_shards)  # failed shards wait for no one
        created = parse_time(p.spec.get("created_at"))
        queued, unqueued = self.queued, self.unqueued
        # Without a live worker nothing moves, whatever the recent rate was: no ETA.
        eta = round(remaining / rate, 1) if rate and remaining > 0 and self.live_workers else None
        return {
            **p.summary(),
            "shards_running": len(self.running),
            "shards_queued": None if queued is None else len(queued),
            "shards_unqueued": None if unqueued is None else len(unqueued),
            "shards_open": len(p.open_shards),
            "images_per_s": None if rate is None else round(rate, 3),
            "rate_source": source,
            "eta_s": eta,
            "created_at": p.spec.get("created_at"),
            "elapsed_s": round((self.read_at - created).total_seconds(), 1) if created else None,
            "read_at": self.read_at.isoformat(timespec="seconds"),
            "queue": {
                "name": p.spec.get("queue"),
                "reachable": self.pending is not None,
                "error": self.redis_error,
            },
            "workers": self.workers,
            "workers_live": len(self.live_workers),
            "failures": [self.failures.get(s) or _failure(s, {}) for s in sorted(p.failed)],
            "last_errors": self.last_errors(),
            "stages": self.stage_totals(),
            "quota": self.quota,
            # Over the stats read (the newest stats_read shards of config/defaults.toml [status]).
            "cost": cost_summary(self.stats.values(), self.gpu_price),
        }


class StatusReader:
    """Reads a job's status again and again (``--watch``), fetching each unchanged object once."""

    def __init__(
        self, job_store: Store, *, use_redis: bool = True, threads: int = 16, gpu_price: float | None = None
    ):
        self.job_store = job_store
        self.gpu_price = gpu_price
        self.use_redis = use_redis
        self.threads = threads
        self._objects: dict[str, tuple[int, dict[str, Any] | None]] = {}  # key -> (size, parsed)
        self._redis = None
        self._redis_failed_at: float | None = None
        self._redis_error: str | None = None
        self._samples: list[tuple[float, int]] = []  # (monotonic, images done)
        self._quota_seen: tuple[Any, dict[str, Any]] | None = None
        cfg = defaults()["status"]
        self.stale_after_intervals = float(cfg["stale_after_intervals"])
        self.stats_read = int(cfg["stats_read"])

    def read(self) -> JobStatus:
        progress = read_progress(self.job_store)
        now = dt.datetime.now(dt.UTC)
        status = JobStatus(progress=progress, read_at=now, gpu_price=self.gpu_price)
        stats = self._read_folder(STATS, self.stats_read)
        status.stats = {s: v for s, v in stats.items() if v is not None}
        failed = self._read_folder(FAILED, listing=progress.listings[FAILED])
        status.failures = {s: _failure(s, v or {}) for s, v in failed.items() if s in progress.failed}
        status.workers = self._workers(now, progress.spec.get("job_url"))
        status.pending, status.redis_error = self._pending(progress)
        status.observed_rate = self._observe(progress.images_done)
        status.quota = self._quota(progress)
        return status

    def _quota(self, progress: Progress) -> dict[str, Any] | None:
        """The quota's progress (``producer topup``), counted again only when commits changed."""
        from producer.quotas import Quota
        from producer.topup import job_quota_progress  # only jobs with a quota need it

        quota = Quota.of(progress.spec)
        if quota is None:
            return None
        key = (quota, frozenset(progress.committed))
        if self._quota_seen is None or self._quota_seen[0] != key:
            self._quota_seen = (key, job_quota_progress(self.job_store, progress, quota))
        return self._quota_seen[1]

    def _read_folder(
        self, folder: str, limit: int | None = None, listing: list[tuple[str, int]] | None = None
    ) -> dict[int, dict[str, Any] | None]:
        """``part-N.json`` objects of a folder by shard (``listing``: the folder as just listed);
        with ``limit``, those of the highest parts only (the newest: shards run in queue order).
        Unchanged objects are not fetched again."""
        if listing is None:
            listing = self.job_store.list(f"{folder}/")
        parts = sorted(
            (shard, key, size)
            for key, size in listing
            if (shard := shard_of_key(key)) is not None and key.endswith(".json")
        )
        if limit is not None:
            parts = parts[-limit:]
        wanted = [key for _shard, key, size in parts if self._objects.get(key, (-1, None))[0] != size]
        sizes = {key: size for _shard, key, size in parts}
        for key, parsed in self._fetch(wanted):
            self._objects[key] = (sizes[key], parsed)
        return {shard: self._objects[key][1] for shard, key, _size in parts}

    def _fetch(self, keys: list[str]) -> list[tuple[str, dict[str, Any] | None]]:
        def get(key: str) -> tuple[str, dict[str, Any] | None]:
            try:
                return key, _load_json(self.job_store.get(key))
            except KeyMissing:  # removed between listing and reading
                return key, None

        if len(keys) <= 1:
            return [get(k) for k in keys]
        with ThreadPoolExecutor(min(self.threads, len(keys))) as pool:
            return list(pool.map(get, keys))

    def _workers(self, now: dt.datetime, job_url: str | None) -> list[dict[str, Any]]:
        keys = [key for key, _size in self.job_store.list(f"{WORKERS}/") if key.endswith(".json")]
        workers = []
        for _key, beat in self._fetch(keys):
            if not beat or not beat.get("worker"):
                continue
            age = heartbeat_age(beat, now)
            live = heartbeat_live(beat, now, self.stale_after_intervals)
            error = beat.get("last_error")
            workers.append(
                {
                    **beat,
                    "last_error": error if _error_of_job(error, job_url) else None,
                    "age_s": None if age is None else round(max(age, 0.0), 1),
                    "live": live,
                }
            )
        workers.sort(key=lambda w: (not w["live"], str(w.get("worker"))))
        return workers

    def _pending(self, progress: Progress) -> tuple[set[int] | None, str | None]:
        """Shards of this job still in Redis, or (None, why) when Redis does not answer."""
        queue = progress.spec.get("queue")
        if not progress.open_shards:
            return set(), None  # nothing left to wait in a queue: Redis need not even be up
        if not self.use_redis or not queue:
            return None, "not asked"
        if self._redis_failed_at is not None and time.monotonic() - self._redis_failed_at < REDIS_RETRY_S:
            return None, self._redis_error
        job_url = progress.spec["job_url"]
        try:
            self._redis = self._redis or redis_client()
            pending = {m.shard for m in pending_messages(self._redis, queue) if m.job_url == job_url}
        except Exception as e:  # unreachable, wrong password, ...: storage still tells the rest
            self._redis, self._redis_failed_at = None, time.monotonic()
            self._redis_error = describe_error(e, 300)
            return None, self._redis_error
        self._redis_failed_at = self._redis_error = None
        return pending, None

    def _observe(self, images_done: int) -> float | None:
        """Images/s over the last minute of readings (only once readings span 10 seconds)."""
        now = time.monotonic()
        self._samples.append((now, images_done))
        self._samples = [(t, n) for t, n in self._samples if now - t <= 60.0]
        first_t, first_n = self._samples[0]
        if now - first_t < 10.0:
            return None
        return (images_done - first_n) / (now - first_t)
