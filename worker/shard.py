"""One shard: manifest → generate → encode → upload → commit, as overlapped stages.

::

    manifest ─▶ generate ─▶ to host ─▶ encode ──────▶ upload ──────▶ all confirmed ─▶ commit ─▶ stats
                device thread          encode pool    upload pool                    task thread
                └── takes a slot per batch: at most max_batches_in_flight generated, not yet uploaded ──┘

Each stage lives in a module named after it; :class:`ShardRunner` wires them:

- **generate** (:mod:`worker.generate`): one thread owns the model and makes every model
  call, fitting each batch to memory. It takes a slot before each batch and a slot is freed
  only when the batch's last upload is confirmed: when storage or encoding is slower than the
  model, generation waits and memory stays flat; a shard is never buffered whole.
- **to host / encode / upload** (:mod:`worker.sink`, :mod:`worker.encode`): a CUDA batch is
  copied to pinned memory while the next one runs (or JPEG-encoded by nvJPEG), encoded on a
  pool of one thread per core, put one object per image by an I/O pool; image-conditioned
  jobs prepare their images on a CPU pool ahead of the device (:mod:`worker.conditioning`).
- **rows and stats** (:mod:`worker.rows`, :mod:`worker.shard_stats`): each attempt's per-row
  results, its metadata columns, and the stats object written after the commit.
- **commit** (:mod:`worker.commit`): the task's thread waits until every upload of the shard
  is confirmed, then writes the metadata parquet only if absent, so of two racing attempts
  exactly one commits. An upload that fails stops the shard's generation and fails the task:
  nothing is committed.
- **the next shard** (:mod:`worker.read_ahead`): a few batches before the end of a shard the
  next message's shard is opened, and its first batches generated while this one commits.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fewstep import UserError
from fewstep.condition_sources import ConditionSources
from fewstep.contract import (
    JOB_SPEC_KEY,
    ShardMessage,
    ShardStats,
    candidate_rows,
    metadata_key,
    new_attempt_id,
    part_name,
)
from fewstep.settings import defaults
from fewstep.storage import Store, open_store, read_table
from worker.batching import BatchSizes
from worker.candidates import Candidates
from worker.commit import ShardGuard, ShutdownRequested, commit_run, shutdown
from worker.conditioning import condition_columns, open_conditioning
from worker.encode import ImageFormat
from worker.generate import DeviceThread
from worker.loaded_model import Model
from worker.read_ahead import Lookahead, ReadAhead
from worker.rows import Maker, OpenShard, ShardRun, metadata_columns, metadata_table
from worker.shard_stats import now, shard_stats, write_stats
from worker.sink import Sink, Slots

log = logging.getLogger("fewstep.worker")


class WrongModel(UserError):
    """A shard for another model reached this worker."""


@dataclass
class ShardResult:
    """What running a shard came to (the task's return value is made from it)."""

    shard: int
    images: int
    committed: bool  # False: another attempt had committed first
    seconds: float
    generate_seconds: float
    stats: ShardStats | None = None


def host_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ShardRunner:
    """Runs shards for one loaded model through the overlapped stages; reused across tasks and jobs."""

    def __init__(
        self,
        model: Model,
        *,
        batch_size: int | BatchSizes,
        upload_threads: int = 16,
        max_batches_in_flight: int = 2,
        encode_threads: int | None = None,
        queue_name: str | None = None,
        gpu_jpeg: str | None = None,
        speed: dict[str, Any] | None = None,
        progress_every: float = 10.0,
        read_ahead: bool = True,
    ):
        self.model = model
        # Per resolution; a plain number is a fixed size (see worker.batching).
        self.batch_sizes = batch_size if isinstance(batch_size, BatchSizes) else BatchSizes(fixed=batch_size)
        self.gpu_jpeg = gpu_jpeg  # the nvJPEG encoder's label when JPEG is encoded on the GPU
        self.speed = dict(speed or {})
        self.progress_every = progress_every
        self.worker_id = worker_id(model.device)
        self.encode_threads = encode_threads or host_cores()
        self.slots = Slots(max_batches_in_flight)
        self.device = DeviceThread(model, self.batch_sizes)
        self.sink = Sink(
            self.slots, encode_threads=self.encode_threads, upload_threads=upload_threads, gpu_jpeg=gpu_jpeg
        )
        # Conditioning images (read, decode, resize, control map) for image-conditioned jobs.
        condition_threads = int(defaults()["conditioning"]["threads"]) or host_cores()
        self.condition_pool = ThreadPoolExecutor(condition_threads, thread_name_prefix="condition")
        # Without a queue to peek at (read_ahead off) the next shard is never opened early.
        self.lookahead = Lookahead(queue_name if read_ahead else None, self._open_ahead)
        self.read_ahead = ReadAhead(self.lookahead, self.device, self.slots, self._stopping)
        self._specs: dict[str, dict[str, Any]] = {}
        self._specs_lock = threading.Lock()
        self._current: ShardRun | None = None
        self._closing = threading.Event()
        #: Called on the task's thread when a shard's attempt starts running (heartbeat).
        self.on_shard_start: Callable[[], None] = lambda: None

    def on_device(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the device thread and return its result (warm-up, probes)."""
        return self.device.call(fn, *args)

    # -- the task's thread: open, run, commit --

    def job_spec(self, store: Store, job_url: str, *, fresh: bool = False) -> dict[str, Any]:
        """The job spec, read once per job, or again with ``fresh`` (each task's start: a job
        deleted and created again under the same name must run with its new spec). An unchanged
        spec stays the same object, so what was read ahead with it stays usable."""
        with self._specs_lock:
            cached = self._specs.get(job_url)
        if cached is not None and not fresh:
            return cached
        spec = json.loads(store.get(JOB_SPEC_KEY))
        with self._specs_lock:
            if self._specs.get(job_url) != spec:
                self._specs[job_url] = spec
            return self._specs[job_url]

    def _open_ahead(self, message: ShardMessage) -> OpenShard | None:
        store = open_store(message.job_url)
        if store.exists(metadata_key(message.shard)):
            return None
        return self.open_shard(message, store)

    def open_shard(self, message: ShardMessage, store: Store) -> OpenShard:
        """Read a shard's job spec and manifest; refuse shards of another model."""
        spec = self.job_spec(store, message.job_url)
        if spec["model"]["name"] != self.model.name:
            raise WrongModel(
                f"shard of job {spec['job']} needs model {spec['model']['name']}, "
                f"this worker runs {self.model.name}"
            )
        rows = read_table(store, message.manifest_key).to_pydict()
        image_format = ImageFormat.from_generation(spec["generation"])
        tokens, limit = self.model.count_tokens(rows["prompt"])
        candidates = Candidates.of(spec)
        if candidates is not None and candidates.keep_all:  # every candidate is a row
            rows = candidate_rows(rows, candidates.k)
            tokens = [t for t in tokens for _ in range(candidates.k)]
        shard = OpenShard(message, spec, store, rows, image_format, tokens, limit, candidates=candidates)
        resolution = shard.resolution
        batch = self.batch_sizes.size(*resolution) if self.batch_sizes.known(*resolution) else 1
        shard.conditioning = open_conditioning(
            spec, self.model.name, self.model.preset, rows, ConditionSources(store), self.condition_pool,
            resolution, batch,
        )  # fmt: skip
        return shard

    def run(
        self,
        message: ShardMessage,
        guard: ShardGuard | None = None,
        attempt_id: str | None = None,
        before_commit: Callable[[], None] = lambda: None,
    ) -> ShardResult:
        """Generate, upload and commit one shard; the entry point of the Celery task.

        ``guard`` (see :mod:`worker.commit`) is asked before each batch's images are written
        and may stop the shard: another attempt committed it, or the shutdown grace ran out.
        ``attempt_id`` (the task's attempt record) names the folder the images go to;
        ``before_commit`` is called right before the commit marker's PUT is sent. The attempt
        stays named in heartbeats (:meth:`progress`) until this returns, commit included.
        """
        start, started_at = time.perf_counter(), now()
        shard = self.lookahead.take(message)  # read ahead, checked not committed moments ago
        if shard is not None and shard.spec is not self._specs.get(message.job_url):
            shard.close()
            shard = None  # read ahead with a spec the job no longer has
        if shard is None:
            store = open_store(message.job_url)
            if store.exists(metadata_key(message.shard)):
                spec = self.job_spec(store, message.job_url)
                log.info("%s %s already committed, skipping", spec["job"], part_name(message.shard))
                return ShardResult(message.shard, 0, False, 0.0, 0.0)
            shard = self.open_shard(message, store)

        run = ShardRun(shard, attempt_id or new_attempt_id(), guard, self.metadata_columns)
        if shard.conditioning is not None:
            run.extra.update(condition_columns(shard.conditioning))
        self.slots.reset_peak()
        self._current = run
        self.on_shard_start()  # the heartbeat names this attempt at once, not a beat later
        try:
            return self._run(run, start, started_at, before_commit)
        finally:
            self._current = None

    def _run(
        self,
        run: ShardRun,
        start: float,
        started_at: dt.datetime,
        before_commit: Callable[[], None],
    ) -> ShardResult:
        shard = run.shard
        self.device.submit(self._generate_shard, run)
        try:
            self._wait(run, start)
        finally:
            shard.close()
        if run.error is not None:
            run.writer.abort()
            raise run.error

        commit_start = time.perf_counter()
        maker = self.maker()
        committed = commit_run(run, lambda: metadata_table(run, maker), before_commit)
        end = time.perf_counter()
        stats = shard_stats(
            run,
            maker,
            start=start,
            end=end,
            commit_s=end - commit_start,
            started_at=started_at,
            idle_s=self.device.idle_seconds(start, end),
            slots=(self.slots.limit, self.slots.peak),
            speed={"device": self.model.device, "dtype": self.model.dtype, **self.speed},
        )
        stats.image_requests = run.writer.requests
        stats.images_generated = run.images_generated
        if committed:
            # The shard is done; its timings are informative and need not hold up the next one.
            self.sink.background(write_stats, shard.store, stats)
            log.info(
                "%s committed: %d images in %.2fs, %.1f img/s; generate %.2fs, encode %.2fs, "
                "upload %.2fs (thread-seconds), waited %.2fs for slots, %s idle %.1f%%%s",
                shard.label,
                stats.images,
                stats.seconds,
                stats.images_per_s,
                stats.generate_s,
                stats.encode_s,
                stats.upload_s,
                stats.wait_s,
                device_kind(self.model.device),
                100 * stats.gpu_idle_fraction,
                f", {run.batches_ahead} batches generated ahead" if run.batches_ahead else "",
            )
        else:
            log.warning("%s was committed by another attempt first; this attempt is discarded", shard.label)
        return ShardResult(shard.message.shard, shard.size, committed, end - start, run.generate_s, stats)

    def _wait(self, run: ShardRun, start: float) -> None:
        """Wait for the shard's stages to finish, logging its progress now and then.

        When the worker's shutdown grace is over, stop waiting at once: uploads may be stuck
        retrying a storage that is down and the device may be inside a long batch, so the
        guard between batches could be reached too late. The shard fails with
        :class:`ShutdownRequested` (its message goes back to the queue) and the stages wind
        down by themselves (no batch is generated or uploaded after the shard's error).
        """
        next_log = time.monotonic() + self.progress_every
        while not run.done.wait(0.25):
            if shutdown.expired():
                run.fail(ShutdownRequested(f"{run.shard.label}: shutdown grace period over"))
                return
            if time.monotonic() >= next_log:
                next_log += self.progress_every
                elapsed = time.perf_counter() - start
                log.info(
                    "%s: %d/%d images uploaded, %.1f img/s",
                    run.shard.label,
                    run.uploaded,
                    run.shard.size,
                    run.uploaded / elapsed,
                )

    def progress(self) -> dict[str, Any] | None:
        """The shard in progress (job, shard, images uploaded of total), for heartbeats."""
        run = self._current
        if run is None:
            return None
        m = run.shard.message
        return {
            "job": run.shard.spec["job"],
            "shard": m.shard,
            "attempt": m.attempt,
            "attempt_id": run.attempt_id,
            "images_done": run.uploaded,
            "images": run.shard.size,
        }

    # -- the device thread: one shard's batches --

    def _generate_shard(self, run: ShardRun) -> None:
        """The generate stage for one shard (device thread): each batch takes a slot, is
        generated (or was, ahead), recorded and handed to the sink."""
        ahead = self.read_ahead.claim(run.shard)
        run.batches_ahead = len(ahead)
        shard, lo, looking_ahead = run.shard, 0, False
        try:
            while lo < shard.size and run.error is None:
                # Three batches before the end: early enough to be ready at the end.
                if not looking_ahead and shard.size - lo <= 3 * self.batch_sizes.size(*shard.resolution):
                    self.lookahead.start(shard.message)
                    looking_ahead = True
                if ahead:
                    generated = ahead.pop(0)  # generated from row 0 on, batch after batch
                else:
                    run.add("wait_s", self.slots.take())
                    if run.error is not None:  # failed while this waited for a slot (an upload):
                        self.slots.free()  # its next batch would be wasted device time
                        break
                    try:
                        generated = self.device.generate_fitting(shard, lo)
                    except BaseException:
                        self.slots.free()
                        raise
                lo, hi = generated.rows
                run.record_batch(generated)
                self.sink.put(run, generated)
                lo = hi
        except BaseException as e:
            run.fail(e)
        finally:
            for _ in ahead:  # left over after a failure
                self.slots.free()
            run.generation_finished()
        if run.error is None:
            self.read_ahead.generate_ahead()

    def _stopping(self) -> bool:
        # A worker shutting down takes no next shard: nothing to generate ahead.
        return self._closing.is_set() or shutdown.requested

    # -- rows --

    def maker(self) -> Maker:
        """What this worker's rows record of it, as it is now (speed options included)."""
        return Maker(
            model=self.model.name,
            model_revision=self.model.revision,
            dtype=self.model.dtype,
            worker=self.worker_id,
            vae=self.speed.get("vae", "default"),
            encoder=self.sink.encoder,
        )

    def metadata_columns(self, run: ShardRun, lo: int, hi: int) -> dict[str, list]:
        """The metadata of rows [lo, hi), column by column (:func:`worker.rows.metadata_columns`)."""
        return metadata_columns(run, lo, hi, self.maker())

    def close(self) -> None:
        """Stop the stages' threads (the worker process's end; tests).

        The device thread finishes the batch it runs, so the interpreter never exits under a
        running model call (which aborts the process).
        """
        self._closing.set()
        self.device.close()
        self.lookahead.close()
        self.condition_pool.shutdown(cancel_futures=True)
        self.sink.close()


def device_kind(device: str) -> str:
    """``GPU`` for a CUDA device, else the device's name (``cpu``): what logs call it."""
    return "GPU" if device.startswith("cuda") else device.split(":")[0]


def worker_id(device: str) -> str:
    """``host:pid:device``, with the pinned GPU when a launcher set CUDA_VISIBLE_DEVICES."""
    ident = f"{socket.gethostname()}:{os.getpid()}:{device}"
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{ident}[gpu {pinned}]" if pinned and device.startswith("cuda") else ident
