"""What a worker is doing, published to storage as a heartbeat while it works on a job.

Celery's task signals feed an :class:`Activity` (current shard, images committed, recent
rate, last error); a :class:`Heartbeat` thread writes it every few seconds to
``{job}/workers/<worker-id>.json`` (``contract.heartbeat_key``) in the folder of the job
the worker is working on. ``producer status`` reads these objects, so the fleet is visible
from storage alone, with Redis gone. A heartbeat whose ``last_seen`` is older than a few
``interval_s`` belongs to a worker that stopped or died.

A heartbeat object::

    {"worker": "gpu-host-3:4121:cuda:0", "host": "gpu-host-3", "pid": 4121,
     "model": "sdxs-512-0.9", "device": "cuda:0", "job": "parti",
     "state": "working" | "idle" | "stopped", "shard": 12, "attempt": 1,
     "attempt_id": "20250102T030405.123456Z-1a2b3c4d",
     "shard_started_at": "...", "shards_done": 11, "images_done": 2816,
     "images_per_s": 310.2, "started_at": "...", "last_seen": "...", "interval_s": 5,
     "last_error": {"job_url": "s3://...", "shard": 7, "error": "...", "at": "..."} | null,
     "version": "0.1.0"}

``last_error`` is the worker's last error on this job only (null when its last error was on
another job).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fewstep import __version__
from fewstep.contract import heartbeat_key
from fewstep.settings import describe_error
from fewstep.storage import open_store

log = logging.getLogger("fewstep.worker")

# Rates are averaged over the shards finished in this many seconds.
RATE_WINDOW_S = 300.0


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


_OUTCOMES = {
    "committed": "committed",
    "superseded": "discarded",
    "already committed": "skipped",
    "failed": "failed",
}


@dataclass
class Activity:
    """A worker's state, updated from Celery's task signals (all on the worker's one task thread)."""

    worker: str
    model: str
    device: str
    job_url: str | None = None
    shard: int | None = None
    attempt: int | None = None
    shard_started_at: str | None = None
    shards_done: dict[str, int] = field(default_factory=dict)  # per job URL
    images_done: dict[str, int] = field(default_factory=dict)  # per job URL: committed images
    images_total: int = 0  # committed images, all jobs
    shard_outcomes: dict[str, int] = field(default_factory=dict)  # committed / skipped / discarded / ...
    busy_seconds: float = 0.0
    last_error: dict[str, Any] | None = None
    started_at: str = field(default_factory=_now)
    #: The shard runner's live progress (images uploaded of the shard in progress), if known.
    progress: Callable[[], dict[str, Any] | None] | None = None
    _shard_start: float = 0.0
    _recent: deque = field(default_factory=deque)  # (finished monotonic, images, seconds)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def working(self) -> bool:
        return self.shard is not None

    def shard_started(self, kwargs: dict[str, Any]) -> None:
        with self._lock:
            self.job_url = kwargs.get("job_url") or self.job_url
            self.shard = int(kwargs["shard"]) if "shard" in kwargs else None
            self.attempt = int(kwargs.get("attempt", 1))
            self.shard_started_at = _now()
            self._shard_start = time.monotonic()

    def shard_finished(self, retval: object, state: str | None) -> None:
        """A shard's task ended with Celery ``state`` and the task's return value."""
        with self._lock:
            if self.shard is None:
                return
            seconds = time.monotonic() - self._shard_start
            self.busy_seconds += seconds
            images = int(retval.get("images", 0)) if isinstance(retval, dict) else 0
            if state == "SUCCESS" and isinstance(retval, dict):
                # The task's own word (worker/app.py): committed, superseded (another attempt
                # committed first), already committed (skipped before it started), failed.
                outcome = _OUTCOMES.get(str(retval.get("state")), "skipped")
            else:
                outcome = (state or "unknown").lower()
            self.shard_outcomes[outcome] = self.shard_outcomes.get(outcome, 0) + 1
            if outcome == "committed":
                job = self.job_url or ""
                self.shards_done[job] = self.shards_done.get(job, 0) + 1
                self.images_done[job] = self.images_done.get(job, 0) + images
                self.images_total += images
            if images:
                self._recent.append((time.monotonic(), images, seconds))
            self.shard = None
            self.attempt = None
            self.shard_started_at = None

    def error(self, error: object) -> None:
        with self._lock:
            # The job too: heartbeats go to the folder of the job in progress, which need not
            # be the job this error came from.
            self.last_error = {
                "job_url": self.job_url,
                "shard": self.shard,
                "error": describe_error(error, 500),
                "at": _now(),
            }

    def images_per_s(self) -> float | None:
        """Images per second of work over the shards finished in the last few minutes."""
        with self._lock:
            horizon = time.monotonic() - RATE_WINDOW_S
            while self._recent and self._recent[0][0] < horizon:
                self._recent.popleft()
            seconds = sum(s for _t, _n, s in self._recent)
            return round(sum(n for _t, n, _s in self._recent) / seconds, 3) if seconds > 0 else None

    def record(self, state: str, interval_s: float) -> dict[str, Any]:
        """The heartbeat object for the current job."""
        rate = self.images_per_s()
        live = self.progress() if self.progress else None
        with self._lock:
            job = self.job_url or ""
            host, pid = socket.gethostname(), os.getpid()
            return {
                "worker": self.worker,
                "host": host,
                "pid": pid,
                "model": self.model,
                "device": self.device,
                "job": job.rstrip("/").rsplit("/", 1)[-1],
                "state": state,
                "shard": self.shard,
                "attempt": self.attempt,
                # The attempt record this worker is at: a "running" record with a live
                # heartbeat naming it is no failure (worker.commit.running_elsewhere).
                "attempt_id": live.get("attempt_id") if live else None,
                "shard_started_at": self.shard_started_at,
                # Images of the shard in progress uploaded so far (not yet committed).
                "shard_images_uploaded": live["images_done"] if live else None,
                "shard_images": live["images"] if live else None,
                "shards_done": self.shards_done.get(job, 0),
                "images_done": self.images_done.get(job, 0),
                "images_per_s": rate,
                "started_at": self.started_at,
                "last_seen": _now(),
                "interval_s": interval_s,
                "last_error": self.last_error if (self.last_error or {}).get("job_url") == job else None,
                "version": __version__,
            }


class Heartbeat:
    """Writes the worker's :class:`Activity` to its job's folder every ``interval`` seconds while it
    works, once more when a shard ends (state ``idle``) and when the worker stops."""

    def __init__(self, activity: Activity, interval: float = 5.0):
        self.activity = activity
        self.interval = interval
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._written_idle: str | None = None  # job URL whose idle heartbeat is written
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def connect(self, signals) -> Heartbeat:
        """Follow the worker's tasks through Celery's signals (the ``celery.signals`` module)."""
        signals.task_prerun.connect(self.task_prerun, weak=False)
        signals.task_postrun.connect(self.task_postrun, weak=False)
        signals.task_failure.connect(self.task_failure, weak=False)
        signals.task_retry.connect(self.task_retry, weak=False)
        signals.worker_shutdown.connect(self.worker_shutdown, weak=False)
        return self

    # Receivers of Celery's signals, called with the signals' keyword arguments.
    def task_prerun(self, kwargs=None, **_):
        """A shard starts: beat now."""
        self.activity.shard_started(kwargs or {})
        self._wake.set()

    def beat_now(self) -> None:
        """Write the heartbeat now (an attempt started: its id is in the next beat)."""
        self._wake.set()

    def task_postrun(self, retval=None, state=None, **_):
        """A shard ended (committed or not): beat now."""
        self.activity.shard_finished(retval, state)
        self._wake.set()

    def task_failure(self, exception=None, **_):
        """Keep the error, for ``producer status``'s last errors."""
        self.activity.error(exception)

    def task_retry(self, reason=None, **_):
        """A shard will be retried later: keep why."""
        self.activity.error(reason)

    def worker_shutdown(self, **_):
        """The worker stops: the last heartbeat says so."""
        self.stop()

    def stop(self) -> None:
        """Stop beating; the last heartbeat says ``stopped``."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=max(10.0, 2 * self.interval))
        self._write("stopped")

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self.activity.working:
                self._write("working")
                self._written_idle = None
            elif self.activity.job_url and self._written_idle != self.activity.job_url:
                self._write("idle")
                self._written_idle = self.activity.job_url
            self._wake.wait(self.interval)
            self._wake.clear()

    def _write(self, state: str) -> None:
        job_url = self.activity.job_url
        if not job_url:
            return
        record = self.activity.record(state, self.interval)
        try:
            # No retries: the next beat is seconds away, and a worker shutting down waits for this one.
            store = open_store(job_url, retry_seconds=0)
            store.put(heartbeat_key(self.activity.worker), json.dumps(record).encode())
        except Exception as e:  # a heartbeat never stops the work
            if not self._warned:
                log.warning("cannot write heartbeat to %s: %s", job_url, describe_error(e, 500))
                self._warned = True
