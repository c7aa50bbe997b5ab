"""Where a generated batch goes: to host, encoded, uploaded, its slot freed.

::

    device thread ─▶ to host ─▶ encode pool (one thread a core) ─▶ upload pool ─▶ slot freed
                └─ nvJPEG on the device (JPEG, torchvision there) ─┘

A batch holds one of :class:`Slots` from before it is generated until its last image is
uploaded or given up (:class:`BatchUploads`): when storage or encoding is slower than the
model, generation waits and memory stays flat. CPU encoding runs in threads: Pillow
compresses with the GIL released (``bench/pipeline.py`` measured threads against processes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from worker.encode import HostPixels, ImageFormat, encode, encode_jpeg_on_device, encoder_label, to_host
from worker.generate import Generated
from worker.rows import ShardRun


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


class Sink:
    """The encode and upload stages: their thread pools, fed by the device thread."""

    def __init__(self, slots: Slots, *, encode_threads: int, upload_threads: int, gpu_jpeg: str | None):
        self.slots = slots
        self.gpu_jpeg = gpu_jpeg  # the nvJPEG encoder's label when JPEG is encoded on the GPU
        self.encode_pool = ThreadPoolExecutor(encode_threads, thread_name_prefix="encode")
        self.upload_pool = ThreadPoolExecutor(upload_threads, thread_name_prefix="upload")

    def encoder(self, image_format: ImageFormat) -> str:
        """The encoder's label for images of ``image_format`` (recorded per row and in stats)."""
        if image_format.name == "jpeg" and self.gpu_jpeg:
            return self.gpu_jpeg
        return encoder_label(image_format)

    def put(self, run: ShardRun, generated: Generated) -> None:
        """Hand a generated batch, which holds a slot, to the encode and upload stages (device thread)."""
        (lo, hi), batch = generated.rows, generated.batch
        n = hi - lo
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

    def background(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the upload pool (a write nothing waits for)."""
        self.upload_pool.submit(fn, *args)

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

    def close(self) -> None:
        """Stop the pools once their queued work is done."""
        self.encode_pool.shutdown()
        self.upload_pool.shutdown()
