"""One shard: manifest → generate → encode → upload → commit, as overlapped stages.

::

    manifest ─▶ generate ─▶ to host ─▶ encode ──────▶ upload ──────▶ all confirmed ─▶ commit ─▶ stats
                device thread          encode pool    upload pool                    task thread
                └── takes a slot per batch: at most max_batches_in_flight generated, not yet uploaded ──┘

- **generate**: one thread owns the model; every model call (warm-up and batch-size probes
  included, see :meth:`ShardRunner.on_device`) runs on it, since CUDA graphs and compile
  caches are per thread. It takes a slot before each batch and a slot is freed only when
  the batch's last upload is confirmed: when storage or encoding is slower than the model,
  generation waits and memory stays flat; a shard is never buffered whole.
- **to host / encode**: a CUDA batch is copied to pinned memory on a side stream while the
  next batch runs; JPEG on CUDA is encoded by nvJPEG instead when torchvision is there.
  CPU encoding runs in a pool of threads, one per core: Pillow compresses with the GIL
  released (``bench/pipeline.py`` measured threads against processes).
- **upload**: an I/O pool of threads putting one object per image.
- **commit**: the task's thread waits until every upload of the shard is confirmed, then
  writes the metadata parquet only if absent, so of two racing attempts exactly one
  commits; the stats object (``stats/part-N.json``) follows. An upload that fails stops
  the shard's generation and fails the task: nothing is committed.

**The next shard.** The worker runs Celery's solo pool with late acks and prefetch 1: the
next message is delivered only after this one is acknowledged, which is after its commit.
Acking earlier could lose a shard, so instead the runner reads ahead. A few batches before
the end of a shard, it peeks (read only) at the next message in its queue and fetches that
shard's manifest; when the last batch is done, the device goes on with the next shard's
first batches (as many as there are free slots) while this shard's last uploads, its
commit, the ack and the next delivery happen. Nothing of the next shard is uploaded before
its message is delivered to this worker; if another worker takes it, those batches are
dropped. Seeds make them the very batches the task would have generated.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from fewstep import UserError
from fewstep.condition_sources import ConditionSources
from fewstep.contract import (
    CONDITION_COLUMNS,
    JOB_SPEC_KEY,
    SCORE_COLUMNS,
    ShardMessage,
    ShardStats,
    image_name,
    job_layout,
    job_metadata_schema,
    job_saves_control,
    metadata_key,
    new_attempt_id,
    part_name,
    stats_key,
)
from fewstep.queue import peek_next, redis_client
from fewstep.scorers import embeddings_wanted
from fewstep.settings import defaults
from fewstep.storage import StorageError, Store, open_store, read_table, requests_sent
from worker.batching import BatchSizes
from worker.commit import ShardGuard, ShutdownRequested, commit, shutdown
from worker.conditioning import INIT, ConditionError, Conditioning, ShardConditioning
from worker.encode import PILLOW, HostPixels, ImageFormat, encode, encode_jpeg_on_device, to_host
from worker.model import Batch, Model
from worker.scoring import BatchScores, Scoring, write_embeddings
from worker.writer import ShardWriter, shard_writer

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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- a shard and its run through the stages ----------------------------------------------


@dataclass
class OpenShard:
    """A shard ready to generate: message, job spec, manifest rows. Its image keys belong to
    an attempt (:class:`ShardRun`): a shard read ahead has no attempt yet."""

    message: ShardMessage
    spec: dict[str, Any]
    store: Store
    rows: dict[str, list]
    image_format: ImageFormat
    tokens: list[int]
    token_limit: int
    #: Image-conditioned jobs: the rows' conditioning images, being prepared ahead (None: text-only).
    conditioning: ShardConditioning | None = None

    @property
    def label(self) -> str:
        """``job part-000042``, for logs."""
        return f"{self.spec['job']} {part_name(self.message.shard)}"

    @property
    def size(self) -> int:
        """Rows (images) in the shard."""
        return len(self.rows["row_id"])

    @property
    def resolution(self) -> tuple[int, int]:
        """The (width, height) the job asks for: batch sizes are kept per resolution."""
        gen = self.spec["generation"]
        return int(gen["width"]), int(gen["height"])

    def is_for(self, message: ShardMessage) -> bool:
        """Whether ``message`` asks for this very shard (any attempt)."""
        m = self.message
        return (m.job_url, m.shard, m.manifest_key) == (message.job_url, message.shard, message.manifest_key)


@dataclass
class Generated:
    """A generated batch: the images, when the device ran it, when it was made, with which sampler."""

    batch: Batch
    busy: tuple[float, float]
    started: dt.datetime
    created: dt.datetime
    sampler: str
    rows: tuple[int, int] = (0, 0)  # the shard's rows [lo, hi) it holds
    batch_size: int = 0  # the batch size it ran at (its rows, but for a shard's last batch)
    too_large: tuple[int, ...] = ()  # batch sizes that ran out of memory before it fitted
    scores: BatchScores | None = None  # the job's scores and embeddings of its images (--score)


@dataclass
class Ahead:
    """The first batches of a shard, generated before its message was delivered (each holds a slot)."""

    shard: OpenShard
    batches: list[Generated]


class ShardRun:
    """One attempt at a shard going through the stages: its image keys, per-row results,
    stage timings, completion."""

    def __init__(
        self,
        shard: OpenShard,
        attempt_id: str,
        guard: ShardGuard | None = None,
        describe: Callable[[ShardRun, int, int], dict[str, list]] | None = None,
    ):
        self.shard = shard
        self.guard = guard
        self.attempt_id = attempt_id
        # Where the images go, by the job's layout; each attempt writes only its own objects.
        self.writer: ShardWriter = shard_writer(
            job_layout(shard.spec),
            shard.store,
            shard.message.shard,
            attempt_id,
            shard.rows["row_id"],
            shard.image_format.extension,
            describe=lambda lo, hi: describe(self, lo, hi),
            schema=job_metadata_schema(shard.spec),
            control=job_saves_control(shard.spec),
        )
        n = shard.size
        self.batch_size = self.min_batch_size = self.oom_retries = 0  # see count_batch
        self.nsfw: list[bool | None] = [None] * n
        # Per-row values of format-4 columns (scores, conditioning), set by the stages that
        # compute them; a column nobody set is null.
        self.extra: dict[str, list] = {}
        self.embeddings: np.ndarray | None = None  # (rows, dim) float16, with --embeddings
        self._embedded = np.zeros(n, dtype=bool)  # rows whose embedding is set
        self.score_s = 0.0
        self.gen_ms: list[float] = [0.0] * n
        self.created: list[dt.datetime | None] = [None] * n
        self.generate_s = self.encode_s = self.encode_cpu_s = self.upload_s = self.wait_s = 0.0
        self.uploaded = 0
        self.batches_ahead = 0
        self.first_batch_at: dt.datetime | None = None
        self.sampler = ""  # what generated the shard's batches (recorded in the metadata)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._open_batches = 0
        self._generating = True

    def add(self, stage: str, seconds: float) -> None:
        """Add to a stage's time (``generate_s``, ``encode_s``, ...); called from any stage."""
        with self._lock:
            setattr(self, stage, getattr(self, stage) + seconds)

    def fail(self, error: BaseException) -> None:
        """Record the shard's first error: later batches are neither generated nor uploaded."""
        with self._lock:
            if self.error is None:
                self.error = error

    def record_scores(self, lo: int, hi: int, scores: BatchScores) -> None:
        """Keep a batch's scores (rows [lo, hi)) for the metadata and its embeddings for the
        embeddings object (device thread, before the batch is handed to the upload stage)."""
        for column, values in scores.columns.items():
            self.extra.setdefault(column, [None] * self.shard.size)[lo:hi] = values
        if scores.embeddings is not None:
            if self.embeddings is None:
                self.embeddings = np.zeros((self.shard.size, scores.embeddings.shape[1]), np.float16)
            self.embeddings[lo:hi] = scores.embeddings
            self._embedded[lo:hi] = True
        self.add("score_s", scores.seconds)

    def embeddings_complete(self) -> np.ndarray:
        """Every row's embedding, or an error naming the first row without one."""
        if self.embeddings is None or not self._embedded.all():
            missing = int(np.argmin(self._embedded))
            row = self.shard.rows["row_id"][missing]
            raise RuntimeError(f"{self.shard.label}: row {row} has no embedding")
        return self.embeddings

    def count_batch(self, generated: Generated) -> None:
        """Record the batch size a batch ran at (device thread): ``batch_size`` is the size
        the shard started with, ``min_batch_size`` the smallest it ran at after halvings."""
        if not self.batch_size:
            self.batch_size = (*generated.too_large, generated.batch_size)[0]
        self.min_batch_size = min(self.min_batch_size or generated.batch_size, generated.batch_size)
        self.oom_retries += len(generated.too_large)

    def batch_started(self) -> None:
        """A generated batch entered the encode and upload stages."""
        with self._lock:
            self._open_batches += 1

    def batch_settled(self, uploaded: int) -> None:
        """Every image of a batch is uploaded (``uploaded`` of them) or given up."""
        with self._lock:
            self._open_batches -= 1
            self.uploaded += uploaded
            self._check_done()

    def generation_finished(self) -> None:
        """The device is done with this shard (all batches generated, or stopped by an error)."""
        with self._lock:
            self._generating = False
            self._check_done()

    def _check_done(self) -> None:
        if not self._generating and self._open_batches == 0:
            self.done.set()


class BatchUploads:
    """Counts a batch's images down to the moment its slot can be freed."""

    def __init__(self, run: ShardRun, size: int, release: Callable[[], None], rows_done: int):
        self.run = run
        self._left = size
        self._ok = 0
        self._lock = threading.Lock()
        self._release = release
        self._rows_done = rows_done
        self._admit_lock = threading.Lock()
        self._admitted = False

    def admit(self) -> bool:
        """True when the batch's images may be written: the shard's guard runs once per batch,
        in the first upload thread that gets here (off the device thread), before any of the
        batch's images is written; a guard that says stop fails the shard."""
        guard = self.run.guard
        if guard is not None:
            with self._admit_lock:
                if not self._admitted:
                    self._admitted = True
                    try:
                        guard.batch_done(self._rows_done)
                    except BaseException as e:
                        self.run.fail(e)
        return self.run.error is None

    def settle(self, ok: bool) -> None:
        """One image of the batch is uploaded (``ok``) or given up; the last one frees the slot."""
        with self._lock:
            self._left -= 1
            self._ok += ok
            last = self._left == 0
        if last:
            self._release()
            self.run.batch_settled(self._ok)


class Slots:
    """At most ``limit`` batches generated but not yet uploaded; tracks the peak."""

    def __init__(self, limit: int):
        self.limit = limit
        self._free = threading.Semaphore(limit)
        self._lock = threading.Lock()
        self.in_use = 0
        self.peak = 0

    def take(self) -> float:
        """Wait for a free slot; returns the seconds waited."""
        start = time.perf_counter()
        self._free.acquire()
        with self._lock:
            self.in_use += 1
            self.peak = max(self.peak, self.in_use)
        return time.perf_counter() - start

    def free(self) -> None:
        """Give a slot back: its batch is uploaded, given up or dropped."""
        with self._lock:
            self.in_use -= 1
        self._free.release()

    def reset_peak(self) -> None:
        """Start measuring the peak anew (per shard)."""
        with self._lock:
            self.peak = self.in_use


class Lookahead:
    """The next shard on this worker's queue, opened before its message is delivered.

    A hint only: another worker may take that message first.
    """

    def __init__(self, queue_name: str | None, open_shard: Callable[[ShardMessage], OpenShard | None]):
        self.queue_name = queue_name
        self._open_shard = open_shard
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lookahead")
        self._future: Future | None = None
        self._client = None

    def start(self, current: ShardMessage) -> None:
        """Peek at the queue and open the next shard in the background."""
        if self.queue_name is not None:
            self._future = self._pool.submit(self._read, current)

    def _read(self, current: ShardMessage) -> OpenShard | None:
        try:
            if self._client is None:
                self._client = redis_client()
            message = peek_next(self._client, self.queue_name)
            if message is None or (message.job_url, message.shard) == (current.job_url, current.shard):
                return None
            return self._open_shard(message)
        except Exception as e:  # a hint that failed costs nothing but the overlap
            log.debug("reading ahead failed: %s", e)
            return None

    def ready(self, timeout: float) -> bool:
        """Whether reading ahead is over (or was never started), waiting up to ``timeout`` seconds."""
        future = self._future
        if future is None:
            return True
        try:
            future.result(timeout=timeout)
        except TimeoutError:
            return False
        return True

    def result(self) -> OpenShard | None:
        """The shard read ahead, if reading ahead is over and found one."""
        future = self._future
        return future.result() if future is not None and future.done() else None

    def take(self, message: ShardMessage) -> OpenShard | None:
        """The shard read ahead if it is the one ``message`` asks for."""
        future, self._future = self._future, None
        if future is None or not future.done():
            return None
        shard = future.result()
        if shard is not None and shard.is_for(message):
            return replace(shard, message=message)
        if shard is not None and shard.conditioning is not None:
            shard.conditioning.close()  # its images were prepared for nothing
        return None

    def close(self) -> None:
        """Stop reading ahead."""
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- the runner ----------------------------------------------------------------------------


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
        self.slots = Slots(max_batches_in_flight)
        self.encode_threads = encode_threads or host_cores()
        self.encode_pool = ThreadPoolExecutor(self.encode_threads, thread_name_prefix="encode")
        # Conditioning images (read, decode, resize, control map) for image-conditioned jobs.
        condition_threads = int(defaults()["condition_images"]["threads"]) or host_cores()
        self.condition_pool = ThreadPoolExecutor(condition_threads, thread_name_prefix="condition")
        self.upload_pool = ThreadPoolExecutor(upload_threads, thread_name_prefix="upload")
        # Without a queue to peek at (read_ahead off) the next shard is never opened early.
        self.lookahead = Lookahead(queue_name if read_ahead else None, self._open_ahead)
        self.worker_id = worker_id(model.device)
        self.scoring = Scoring(model.device, model.dtype)  # scorer models, loaded by the device thread
        self._specs: dict[str, dict[str, Any]] = {}
        self._specs_lock = threading.Lock()
        self._device_calls: queue.Queue = queue.Queue()
        self._busy: deque[tuple[float, float]] = deque()  # device busy intervals (perf_counter)
        self._running_since: float | None = None  # start of the batch on the device now
        self._busy_lock = threading.Lock()
        self._ahead: Ahead | None = None  # touched by the device thread only
        self._current: ShardRun | None = None
        self._keep_on_device = model.device.startswith("cuda")
        self._closing = threading.Event()
        #: Called on the task's thread when a shard's attempt starts running (heartbeat).
        self.on_shard_start: Callable[[], None] = lambda: None
        self._device = threading.Thread(target=self._device_loop, name="generate", daemon=True)
        self._device.start()

    # -- the device thread --

    def on_device(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the device thread and return its result."""
        future: Future = Future()
        self._device_calls.put((fn, args, future))
        return future.result()

    def _device_loop(self) -> None:
        while True:
            item = self._device_calls.get()
            if item is None:
                return
            fn, args, future = item
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)

    def _generate(self, shard: OpenShard, lo: int, hi: int) -> Generated:
        gen = shard.spec["generation"]
        # The job's sampler, switched here on the device thread: batches generated ahead for
        # the next shard may belong to a job with another sampler.
        self.model.use_sampler(gen.get("sampler"))
        conditioning = self._conditioning_inputs(shard, lo, hi)  # waits for the CPU pool's maps
        started = _now()
        start = self._running_since = time.perf_counter()
        batch = self.model.generate(
            shard.rows["prompt"][lo:hi],
            shard.rows["seed"][lo:hi],
            steps=gen["steps"],
            guidance=gen["guidance"],
            width=gen["width"],
            height=gen["height"],
            keep_on_device=self._keep_on_device,
            **conditioning,
        )
        if shard.conditioning is not None:
            shard.conditioning.release(lo, hi)
        # Scored here, from the decoded images still on the device, so batches generated ahead
        # for the next shard carry their scores too.
        scores = self.scoring.score(shard.spec.get("scoring"), batch.images, shard.rows["prompt"][lo:hi])
        busy = (start, time.perf_counter())
        with self._busy_lock:
            self._busy.append(busy)
            self._running_since = None
        return Generated(batch, busy, started, _now(), self.model.sampler, (lo, hi), scores=scores)

    def _generate_fitting(self, shard: OpenShard, lo: int) -> Generated:
        """The batch from row ``lo`` at the batch size for the shard's resolution, halved
        after each out-of-memory error (device thread; see :meth:`BatchSizes.fit`)."""
        generated, size, too_large = self.batch_sizes.fit(
            *shard.resolution, lambda size: self._generate(shard, lo, min(lo + size, shard.size))
        )
        return replace(generated, batch_size=size, too_large=too_large)

    def _generate_shard(self, run: ShardRun) -> None:
        """The generate stage for one shard (device thread)."""
        ahead = self._claim_ahead(run.shard)
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
                    try:
                        generated = self._generate_fitting(shard, lo)
                    except BaseException:
                        self.slots.free()
                        raise
                lo, hi = generated.rows
                run.first_batch_at = run.first_batch_at or generated.started
                run.add("generate_s", generated.busy[1] - generated.busy[0])
                run.count_batch(generated)
                self._sink(run, lo, hi, generated)
                lo = hi
        except BaseException as e:
            run.fail(e)
        finally:
            for _ in ahead:  # left over after a failure
                self.slots.free()
            run.generation_finished()
        if run.error is None:
            self._generate_ahead()

    def _claim_ahead(self, shard: OpenShard) -> list[Generated]:
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return []
        if ahead.shard.is_for(shard.message):
            return ahead.batches
        for _ in ahead.batches:  # another worker got that shard: drop its batches
            self.slots.free()
        if ahead.batches:
            log.info("%s went to another worker: dropped %d batches generated ahead", ahead.shard.label,
                     len(ahead.batches))  # fmt: skip
        return []

    def _generate_ahead(self) -> None:
        """Generate the next shard's first batches while this one finishes (device thread).

        Stops as soon as a task arrives, when every slot is taken, or when the worker stops.
        """
        deadline = time.monotonic() + 5.0
        while not self.lookahead.ready(timeout=0.02):
            if self._stopping() or not self._device_calls.empty() or time.monotonic() > deadline:
                return
        shard = self.lookahead.result()
        # A resolution not measured yet is measured by the task: a hint must not hold the device.
        if shard is None or not self.batch_sizes.known(*shard.resolution):
            return
        self._ahead = Ahead(shard, [])
        lo = 0
        while lo < shard.size and len(self._ahead.batches) < self.slots.limit:
            if self._stopping() or not self._device_calls.empty():
                return
            self.slots.take()
            try:
                self._ahead.batches.append(self._generate_fitting(shard, lo))
            except Exception as e:
                self.slots.free()
                log.debug("generating ahead failed: %s", e)  # the task will generate it again
                return
            lo = self._ahead.batches[-1].rows[1]

    def _stopping(self) -> bool:
        # A worker shutting down takes no next shard: nothing to generate ahead.
        return self._closing.is_set() or shutdown.requested

    # -- the encode and upload stages --

    def _sink(self, run: ShardRun, lo: int, hi: int, generated: Generated) -> None:
        """Hand a generated batch to the encode and upload stages (device thread)."""
        n, batch, created = hi - lo, generated.batch, generated.created
        run.sampler = generated.sampler
        run.nsfw[lo:hi] = batch.nsfw
        run.gen_ms[lo:hi] = [1000 * batch.seconds / n] * n
        run.created[lo:hi] = [created] * n
        if generated.scores is not None:
            run.record_scores(lo, hi, generated.scores)
        run.batch_started()
        uploads = BatchUploads(run, n, self.slots.free, hi)
        image_format = run.shard.image_format
        try:
            if image_format.name == "jpeg" and self.gpu_jpeg:
                start = time.perf_counter()
                encoded = encode_jpeg_on_device(batch.images, image_format.quality)
                run.add("encode_s", time.perf_counter() - start)
                for i, data in enumerate(encoded):
                    self.upload_pool.submit(self._upload, run, uploads, lo + i, data)
                return
            pixels = to_host(batch.images)
        except BaseException as e:
            run.fail(e)
            for _ in range(n):
                uploads.settle(False)
            return
        for i in range(n):
            self.encode_pool.submit(self._encode, run, uploads, pixels, i, lo + i)

    def _encode(self, run: ShardRun, uploads: BatchUploads, pixels: HostPixels, i: int, row: int) -> None:
        if run.error is not None:
            uploads.settle(False)
            return
        try:
            start, cpu = time.perf_counter(), time.thread_time()
            data = encode(pixels.array()[i], run.shard.image_format)
            run.add("encode_cpu_s", time.thread_time() - cpu)
            run.add("encode_s", time.perf_counter() - start)
        except BaseException as e:
            run.fail(e)
            uploads.settle(False)
            return
        self.upload_pool.submit(self._upload, run, uploads, row, data)

    def _upload(self, run: ShardRun, uploads: BatchUploads, row: int, data: bytes) -> None:
        if not uploads.admit():  # stopped: a failure, another attempt's commit, or shutdown
            uploads.settle(False)
            return
        try:
            start = time.perf_counter()
            control = run.shard.conditioning.take_control(row) if run.shard.conditioning else None
            run.writer.add(row, data, control)
            run.add("upload_s", time.perf_counter() - start)
        except BaseException as e:
            run.fail(e)
            uploads.settle(False)
            return
        uploads.settle(True)

    # -- image-conditioned jobs (worker/conditioning.py) --

    def _open_conditioning(self, shard: OpenShard) -> ShardConditioning | None:
        """Start preparing a conditioned shard's images on the CPU pool (read-ahead included):
        a few batches ahead, never the whole shard. None for a text-only job."""
        settings = Conditioning.from_spec(shard.spec)
        preset = self.model.preset
        if settings is None:
            if preset.get("control"):
                raise ConditionError(
                    f"job {shard.spec['job']} is text-only; model {self.model.name} is a ControlNet "
                    "preset and needs a conditioning image per row"
                )
            return None
        if settings.condition == INIT and not preset.get("img2img"):
            raise ConditionError(f"job {shard.spec['job']}: model {self.model.name} has no img2img pipeline")
        modes = (preset.get("control") or {}).get("modes", ())
        if settings.condition != INIT and settings.condition not in modes:
            raise ConditionError(
                f"job {shard.spec['job']}: model {self.model.name} takes no {settings.condition} control maps"
            )
        # What runs when the spec leaves it to the preset: recorded as run.
        if settings.condition == INIT and settings.strength is None:
            settings = replace(settings, strength=float(preset["img2img"]["strength"]))
        if settings.condition != INIT and settings.controlnet_scale is None:
            settings = replace(settings, controlnet_scale=float(preset["control"].get("scale", 1.0)))
        batch = self.batch_sizes.size(*shard.resolution) if self.batch_sizes.known(*shard.resolution) else 1
        window = int(defaults()["condition_images"]["batches_ahead"]) * batch
        conditioning = ShardConditioning(
            settings, shard.rows, ConditionSources(shard.store), self.condition_pool, shard.resolution, window
        )
        conditioning.start()
        return conditioning

    def _conditioning_inputs(self, shard: OpenShard, lo: int, hi: int) -> dict[str, Any]:
        """The batch's conditioning arguments for :meth:`Model.generate` (device thread; waits
        for the pool): init images and strength, or control maps and their scale."""
        if shard.conditioning is None:
            return {}
        settings = shard.conditioning.settings
        images = [p.image for p in shard.conditioning.batch(lo, hi)]
        if settings.condition == INIT:
            return {"images": images, "strength": settings.strength}
        return {"control_images": images, "controlnet_scale": settings.controlnet_scale}

    def _condition_columns(self, run: ShardRun) -> None:
        """The conditioning metadata of a shard's rows (``run.extra``); ``cond_sha256`` fills in
        as the pool reads each row's bytes, the control map columns come from the writer."""
        conditioning = run.shard.conditioning
        if conditioning is None:
            return
        settings, n = conditioning.settings, run.shard.size
        run.extra.update(
            cond_key=[conditioning.source(i) for i in range(n)],
            cond_sha256=conditioning.sha256,
            condition=[settings.condition] * n,
            strength=[settings.strength] * n,
            controlnet_scale=[settings.controlnet_scale] * n,
            resize=[settings.resize] * n,
        )

    # -- the task's thread --

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
        shard = OpenShard(message, spec, store, rows, image_format, tokens, limit)
        shard.conditioning = self._open_conditioning(shard)
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
        start, started_at, requests = time.perf_counter(), _now(), requests_sent()
        shard = self.lookahead.take(message)  # read ahead, checked not committed moments ago
        if shard is not None and shard.spec is not self._specs.get(message.job_url):
            if shard.conditioning is not None:
                shard.conditioning.close()
            shard = None  # read ahead with a spec the job no longer has
        if shard is None:
            store = open_store(message.job_url)
            if store.exists(metadata_key(message.shard)):
                spec = self.job_spec(store, message.job_url)
                log.info("%s %s already committed, skipping", spec["job"], part_name(message.shard))
                return ShardResult(message.shard, 0, False, 0.0, 0.0)
            shard = self.open_shard(message, store)

        run = ShardRun(shard, attempt_id or new_attempt_id(), guard, self.metadata_columns)
        self._condition_columns(run)
        self.slots.reset_peak()
        self._current = run
        self.on_shard_start()  # the heartbeat names this attempt at once, not a beat later
        try:
            return self._run(run, start, started_at, requests, before_commit)
        finally:
            self._current = None

    def _run(
        self,
        run: ShardRun,
        start: float,
        started_at: dt.datetime,
        requests: int,
        before_commit: Callable[[], None],
    ) -> ShardResult:
        shard, message = run.shard, run.shard.message
        self._device_calls.put((self._generate_shard, (run,), Future()))
        try:
            self._wait(run, start)
        finally:
            if shard.conditioning is not None:
                shard.conditioning.close()
        if run.error is not None:
            run.writer.abort()
            raise run.error

        commit_start = time.perf_counter()
        try:
            run.writer.finish()  # a tar or parquet is complete in storage only now
            if embeddings_wanted(shard.spec):  # before the commit: a commit implies its embeddings
                write_embeddings(shard.store, message.shard, run.attempt_id, shard.rows["row_id"],
                                 run.embeddings_complete())  # fmt: skip
        except BaseException:
            run.writer.abort()
            raise
        # Checked complete, then written only if absent: of two racing attempts one commits.
        schema = job_metadata_schema(shard.spec)  # a job of an older format has fewer columns
        columns = self.metadata_columns(run, 0, shard.size)
        table = pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)
        committed = commit(
            shard.store, message.shard, table, shard.size, job_layout(shard.spec), before_put=before_commit
        )
        end = time.perf_counter()
        stats = self._stats(run, start, end, end - commit_start, started_at)
        stats.image_requests, stats.storage_requests = run.writer.requests, requests_sent() - requests
        if committed:
            # The shard is done; its timings are informative and need not hold up the next one.
            self.upload_pool.submit(self._write_stats, shard.store, stats)
            log.info(
                "%s committed: %d images in %.2fs, %.1f img/s; generate %.2fs, encode %.2fs, "
                "upload %.2fs (thread-seconds), waited %.2fs for slots, GPU idle %.1f%%%s",
                shard.label,
                stats.images,
                stats.seconds,
                stats.images_per_s,
                stats.generate_s,
                stats.encode_s,
                stats.upload_s,
                stats.wait_s,
                100 * stats.gpu_idle_fraction,
                f", {run.batches_ahead} batches generated ahead" if run.batches_ahead else "",
            )
        else:
            log.warning("%s was committed by another attempt first; this attempt is discarded", shard.label)
        return ShardResult(message.shard, shard.size, committed, end - start, run.generate_s, stats)

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

    def _idle_seconds(self, start: float, end: float) -> float:
        """Time in [start, end] in which the device ran no batch (of any shard)."""
        with self._busy_lock:
            while self._busy and self._busy[0][1] < start:
                self._busy.popleft()
            running = [(self._running_since, end)] if self._running_since is not None else []
            busy = sum(max(0.0, min(b, end) - max(a, start)) for a, b in [*self._busy, *running])
        return max(0.0, (end - start) - busy)

    def _stats(
        self, run: ShardRun, start: float, end: float, commit_s: float, started_at: dt.datetime
    ) -> ShardStats:
        shard, seconds = run.shard, end - start
        images = shard.size
        f = shard.image_format
        return ShardStats(
            job=shard.spec["job"],
            shard=shard.message.shard,
            attempt=shard.message.attempt,
            worker=self.worker_id,
            model=self.model.name,
            images=images,
            batch_size=run.batch_size,
            min_batch_size=run.min_batch_size,
            oom_retries=run.oom_retries,
            seconds=round(seconds, 6),
            generate_s=round(run.generate_s, 6),
            encode_s=round(run.encode_s, 6),
            encode_cpu_s=round(run.encode_cpu_s, 6),
            upload_s=round(run.upload_s, 6),
            commit_s=round(commit_s, 6),
            score_s=round(run.score_s, 6),
            wait_s=round(run.wait_s, 6),
            gpu_idle_fraction=round(self._idle_seconds(start, end) / seconds, 6) if seconds else 0.0,
            images_per_s=round(images / seconds, 3) if seconds else 0.0,
            max_batches_in_flight=self.slots.limit,
            peak_batches_in_flight=self.slots.peak,
            batches_ahead=run.batches_ahead,
            format={"name": f.name, "quality": f.quality, "png_level": f.png_level},
            encoder=self._encoder(f),
            speed={"device": self.model.device, "dtype": self.model.dtype, **self.speed},
            first_batch_at=run.first_batch_at.isoformat(),
            started_at=started_at.isoformat(),
            finished_at=_now().isoformat(),
        )

    def _write_stats(self, store: Store, stats: ShardStats) -> None:
        try:
            store.put(stats_key(stats.shard), json.dumps(stats.to_json(), indent=1).encode())
        except (StorageError, UserError) as e:  # the shard is committed; stats are only informative
            log.warning("%s %s: stats not written: %s", stats.job, part_name(stats.shard), e)

    def _encoder(self, image_format: ImageFormat) -> str:
        if image_format.name == "jpeg" and self.gpu_jpeg:
            return self.gpu_jpeg
        return PILLOW

    def metadata_columns(self, run: ShardRun, lo: int, hi: int) -> dict[str, list]:
        """The metadata of the shard's rows [lo, hi), column by column: the commit marker's
        rows, and the tar's ``.json`` members and the parquet layout's columns."""
        shard, writer = run.shard, run.writer
        spec, message, rows = shard.spec, shard.message, shard.rows
        gen, f = spec["generation"], shard.image_format
        n = hi - lo
        fields = spec["source"].get("fields", {})
        tokens = shard.tokens[lo:hi]
        digests = writer.digests[lo:hi]
        columns = {
            "image_name": [image_name(r, f.extension) for r in rows["row_id"][lo:hi]],
            "prompt": rows["prompt"][lo:hi],
            "part_id": [message.shard] * n,
            "seed": rows["seed"][lo:hi],
            "step": [gen["steps"]] * n,
            "cfg": [gen["guidance"]] * n,
            "sampler": [run.sampler] * n,
            "width": [gen["width"]] * n,
            "height": [gen["height"]] * n,
            "model": [self.model.name] * n,
            "model_revision": [self.model.revision] * n,
            "row_id": rows["row_id"][lo:hi],
            "image_key": writer.keys[lo:hi],
            "format": [f.name] * n,
            "sha256": [d and d[0] for d in digests],
            "bytes": [d and d[1] for d in digests],
            "nsfw": run.nsfw[lo:hi],
            "prompt_tokens": tokens,
            "truncated": [bool(shard.token_limit) and t > shard.token_limit for t in tokens],
            "source": [spec["source"]["name"]] * n,
            "source_row": rows["source_row"][lo:hi],
            "gen_ms": run.gen_ms[lo:hi],
            "worker": [self.worker_id] * n,
            "attempt": [message.attempt] * n,
            "attempt_id": [run.attempt_id] * n,
            "created_at": run.created[lo:hi],
            "format_quality": [f.quality] * n,
            "png_level": [f.png_level] * n,
            "encoder": [self._encoder(f)] * n,
            "dtype": [self.model.dtype] * n,
            "vae": [self.speed.get("vae", "default")] * n,
            "image_offset": writer.offsets[lo:hi],
            "image_row": writer.image_rows[lo:hi],
        }
        for name in SCORE_COLUMNS + CONDITION_COLUMNS:
            values = run.extra.get(name)
            columns[name] = values[lo:hi] if values is not None else [None] * n
        if job_saves_control(spec):
            columns["control_key"] = writer.control_keys[lo:hi]
            columns["control_offset"] = writer.control_offsets[lo:hi]
            columns["control_bytes"] = writer.control_sizes[lo:hi]
        for name in fields:
            columns[name] = rows[name][lo:hi]
        return columns

    def close(self) -> None:
        """Stop the stages' threads (the worker process's end; tests).

        The device thread finishes the batch it runs, so the interpreter never exits under a
        running model call (which aborts the process).
        """
        self._closing.set()
        self._device_calls.put(None)
        self._device.join(timeout=30)
        self.lookahead.close()
        self.condition_pool.shutdown(cancel_futures=True)
        self.encode_pool.shutdown()
        self.upload_pool.shutdown()


def worker_id(device: str) -> str:
    """``host:pid:device``, with the pinned GPU when a launcher set CUDA_VISIBLE_DEVICES."""
    ident = f"{socket.gethostname()}:{os.getpid()}:{device}"
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{ident}[gpu {pinned}]" if pinned and device.startswith("cuda") else ident
