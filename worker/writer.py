"""Where one attempt's encoded images go, by the job's layout: one object per image, or
one object per shard attempt holding them all.

- **files**: each image is put as its own object, ``images/part-N/<attempt-id>/<row>.<ext>``,
  as soon as it is encoded (one request per image).
- **webdataset**: one tar, ``images/part-N/<attempt-id>.tar``; per row, in row order, the
  members ``<row>.<ext>`` (the image), ``<row>.json`` (its metadata row) and ``<row>.txt``
  (the prompt, UTF-8, byte-exact): WebDataset's sample convention.
- **parquet**: one parquet, ``images/part-N/<attempt-id>.parquet``: the ``image`` column
  (HF datasets' ``Image`` struct) next to every metadata column, a row group every
  ``parquet_row_group_rows`` images.

Tar and parquet are written in row order while the shard runs: an image encoded ahead of
an earlier row waits for it (at most the batches in flight), and the bytes are streamed to
storage in parts of ``part_bytes`` (:class:`fewstep.storage.Upload`) by a thread of their own
(:class:`PartSender`): the upload threads that append rows never wait for a part's PUT (a
64 MiB part sent inline stalled every upload thread, then the model, for its whole PUT). A
worker holds at most about three parts of a shard's object: one being sent, one queued, one
filling. The object becomes visible only when
:meth:`ShardWriter.finish` completes it, before the commit; a worker killed midway leaves
an unfinished multipart upload (``producer reconcile`` aborts it), never a readable partial
tar. A few storage requests per shard instead of one per image.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fewstep.contract import (
    CONTROL_IMAGE_COLUMN,
    IMAGE_COLUMN,
    LAYOUT_FILES,
    LAYOUT_WEBDATASET,
    TAR_BLOCK,
    TAR_END,
    attempt_images_prefix,
    control_name,
    image_key,
    image_name,
    images_parquet_schema,
    shard_object_key,
    tar_control_offset,
    webdataset_sample,
)
from fewstep.settings import defaults
from fewstep.storage import Store, Upload
from worker.commit import failpoint

#: The metadata columns of rows [lo, hi) of the shard, as lists (see ShardRunner.metadata_columns).
Describe = Callable[[int, int], dict[str, list]]


class ShardWriter:
    """Takes a shard attempt's encoded images (any order, any thread) and stores them."""

    def __init__(self, store: Store, shard: int, attempt_id: str, row_ids: list[int], ext: str):
        self.store = store
        self.shard = shard
        self.attempt_id = attempt_id
        self.row_ids = row_ids
        self.ext = ext
        n = len(row_ids)
        self.keys: list[str] = []
        self.digests: list[tuple[str, int] | None] = [None] * n
        self.offsets: list[int | None] = [None] * n  # webdataset: the image data's offset in the tar
        self.image_rows: list[int | None] = [None] * n  # parquet: the image's row in the parquet
        # Saved control maps (--save-control): key, offset in a tar, size; None without one.
        self.control_keys: list[str | None] = [None] * n
        self.control_offsets: list[int | None] = [None] * n
        self.control_sizes: list[int | None] = [None] * n
        self.requests = 0  # storage requests made for the images

    def add(self, index: int, data: bytes, control: bytes | None = None) -> None:
        """Store the image of the shard's row ``index`` (and its control map, if saved)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Every image was added: make the stored object(s) complete (before the commit)."""

    def abort(self) -> None:
        """The attempt failed: drop what is unfinished (an object nobody will complete)."""


class FilesWriter(ShardWriter):
    """One object per image, put as it comes."""

    def __init__(self, store: Store, shard: int, attempt_id: str, row_ids: list[int], ext: str):
        super().__init__(store, shard, attempt_id, row_ids, ext)
        # Keys in this attempt's own folder: no other attempt ever writes them.
        self.keys = [image_key(shard, attempt_id, r, ext) for r in row_ids]

    def add(self, index: int, data: bytes, control: bytes | None = None) -> None:
        if control is not None:  # beside the image, in the attempt's folder
            key = attempt_images_prefix(self.shard, self.attempt_id) + control_name(self.row_ids[index])
            self.store.put(key, control)
            self.control_keys[index], self.control_sizes[index] = key, len(control)
        self.store.put(self.keys[index], data)
        self.digests[index] = (hashlib.sha256(data).hexdigest(), len(data))

    def finish(self) -> None:
        # One PUT per image (and control map) stored.
        self.requests = sum(d is not None for d in self.digests) + sum(
            k is not None for k in self.control_keys
        )


class PartSender(Upload):
    """An :class:`Upload` in front of another: each full part is handed to one sender thread,
    which sends it as the inner upload's next part, in order. A writer waits only when a part
    is already queued behind the one being sent (storage slower than the model).

    Written bytes are kept as the caller's objects and joined once per part: at ~0.4 ms per
    copy of a 520 KB PNG on these machines, the copies a byte buffer makes cost more than fpng.
    """

    def __init__(self, upload: Upload):
        super().__init__(upload.key, upload.part_bytes)
        self.upload = upload
        self._chunks: collections.deque[bytes | memoryview] = collections.deque()
        self._pending = 0  # bytes in _chunks
        self._parts: queue.Queue[bytes | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def write(self, data: bytes) -> int:
        """Append ``data``; raises what sending an earlier part raised."""
        if self._error is not None:
            raise self._error
        if not isinstance(data, bytes):  # pyarrow may reuse the buffer it hands over
            data = bytes(data)
        self._chunks.append(data)
        self._pending += len(data)
        self._written += len(data)
        while self._pending >= self.part_bytes:
            self._send(self._take(self.part_bytes))
        return len(data)

    def _take(self, n: int) -> bytes:
        """The first ``n`` bytes written and not yet taken, in one copy."""
        out, size = [], 0
        while size < n:
            chunk, need = self._chunks[0], n - size
            if len(chunk) <= need:
                out.append(self._chunks.popleft())
                size += len(chunk)
            else:
                view = memoryview(chunk)
                out.append(view[:need])
                self._chunks[0] = view[need:]
                size = n
        self._pending -= n
        return b"".join(out)

    def _send(self, part: bytes) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._sender, name="part-sender", daemon=True)
            self._thread.start()
        self._parts.put(part)

    def _sender(self) -> None:
        while (part := self._parts.get()) is not None:
            if self._error is None and not self._stop:
                try:
                    self.upload.send_part(part)  # the inner upload's part primitive: no copy of its own
                except BaseException as e:  # raised to the writer at its next write or finish
                    self._error = e

    def _drain(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._parts.put(None, timeout=timeout)
            self._thread.join(timeout)

    def finish(self) -> int:
        """Wait for the parts sent so far, send the rest and make the object; returns its size."""
        self._drain()
        if self._error is not None:
            raise self._error
        self.upload.write(self._take(self._pending))
        self.upload.finish()
        return self._written

    def abort(self, timeout: float = 30) -> None:
        """Stop sending and drop the upload (after the part being sent, at most ``timeout`` s)."""
        self._stop = True
        with contextlib.suppress(queue.Empty):
            while True:  # parts still queued are dropped
                self._parts.get_nowait()
        with contextlib.suppress(queue.Full):
            self._drain(timeout)
        self.upload.abort()


class StreamWriter(ShardWriter):
    """One object for the attempt, appended in row order and uploaded in parts."""

    layout = ""

    def __init__(
        self,
        store: Store,
        shard: int,
        attempt_id: str,
        row_ids: list[int],
        ext: str,
        describe: Describe,
        part_bytes: int,
    ):
        super().__init__(store, shard, attempt_id, row_ids, ext)
        self.key = shard_object_key(shard, attempt_id, self.layout)
        self.keys = [self.key] * len(row_ids)
        self.describe = describe
        self.upload = PartSender(store.upload(self.key, part_bytes))
        self._pending: dict[int, tuple[bytes, bytes | None]] = {}
        self._next = 0  # the next row to append
        self._lock = threading.Lock()
        self._aborted = False

    def add(self, index: int, data: bytes, control: bytes | None = None) -> None:
        digest = (hashlib.sha256(data).hexdigest(), len(data))  # outside the lock: threads hash in parallel
        with self._lock:
            if self._aborted:
                return
            self.digests[index] = digest
            self._pending[index] = (data, control)
            while self._next in self._pending:
                start = self._next
                while self._next in self._pending:
                    self._next += 1
                self._append(start, self._next, [self._pending.pop(i) for i in range(start, self._next)])
                if start < len(self.row_ids) // 2 <= self._next:
                    # Fault tests kill a worker here, its object half written.
                    failpoint("mid-upload", self.shard)

    def _append(self, lo: int, hi: int, images: list[tuple[bytes, bytes | None]]) -> None:
        """Append rows [lo, hi): (image, control map or None) each."""
        raise NotImplementedError

    def finish(self) -> None:
        with self._lock:
            self._close()
            self.upload.finish()
            self.requests = self.upload.upload.requests

    def _close(self) -> None:
        """Write what ends the object (tar end blocks, parquet footer)."""

    def abort(self) -> None:
        if self._lock.acquire(timeout=30):  # an upload thread may be stuck on a storage that is down
            try:
                self._aborted = True
                self.upload.abort()
            finally:
                self._lock.release()


class TarWriter(StreamWriter):
    """A WebDataset tar: ``<row>.<ext>``, ``<row>.json``, ``<row>.txt`` per row, in row order,
    as ``producer finalize --webdataset`` writes them (:func:`fewstep.contract.webdataset_sample`)."""

    layout = LAYOUT_WEBDATASET

    def _append(self, lo: int, hi: int, images: list[tuple[bytes, bytes | None]]) -> None:
        columns = self.describe(lo, hi)  # once for the rows appended together
        for j, (i, (data, control)) in enumerate(zip(range(lo, hi), images, strict=True)):
            row = {k: v[j] for k, v in columns.items()}
            # Known before writing, so the .json member records it.
            row["image_offset"] = self.offsets[i] = self.upload.tell() + TAR_BLOCK
            if control is not None:
                self.control_keys[i], self.control_sizes[i] = self.key, len(control)
                self.control_offsets[i] = tar_control_offset(self.offsets[i], len(data))
                row.update(
                    control_key=self.key, control_offset=self.control_offsets[i], control_bytes=len(control)
                )
            self.upload.write(webdataset_sample(row, data, control))

    def _close(self) -> None:
        self.upload.write(TAR_END)


class ParquetWriter(StreamWriter):
    """A parquet of the images with their metadata, row groups written as rows arrive in order."""

    layout = "parquet"

    def __init__(self, *args: Any, schema: pa.Schema, row_group_rows: int, control: bool, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.control = control
        self.schema = images_parquet_schema(schema, control)
        self.row_group_rows = row_group_rows
        self._rows: list[int] = []
        self._images: list[tuple[bytes, bytes | None]] = []
        # Image bytes are compressed already: zstd only for the metadata columns.
        codecs = {name: "zstd" for name in self.schema.names}
        codecs[f"{IMAGE_COLUMN}.bytes"] = "none"
        if control:
            codecs[f"{CONTROL_IMAGE_COLUMN}.bytes"] = "none"  # PNG: compressed already
        # No dictionary for the images either: distinct images gain nothing from it (and a
        # benchmark's repeated images would shrink to one copy, hiding the real size).
        dictionary = [name for name in self.schema.names if name not in (IMAGE_COLUMN, CONTROL_IMAGE_COLUMN)]
        self._writer = pq.ParquetWriter(
            pa.PythonFile(self.upload, mode="w"), self.schema, compression=codecs, use_dictionary=dictionary
        )

    def _append(self, lo: int, hi: int, images: list[tuple[bytes, bytes | None]]) -> None:
        for i, (_data, control) in zip(range(lo, hi), images, strict=True):
            self.image_rows[i] = i
            if control is not None:  # the same row's control_image column
                self.control_keys[i], self.control_offsets[i], self.control_sizes[i] = (
                    self.key,
                    i,
                    len(control),
                )
        self._rows.extend(range(lo, hi))
        self._images.extend(images)
        while len(self._rows) >= self.row_group_rows:
            self._write_group(self.row_group_rows)

    def _write_group(self, n: int) -> None:
        rows, self._rows = self._rows[:n], self._rows[n:]
        images, self._images = self._images[:n], self._images[n:]
        lo, hi = rows[0], rows[-1] + 1
        names = [image_name(self.row_ids[i], self.ext) for i in rows]
        columns = {IMAGE_COLUMN: [{"bytes": d, "path": p} for (d, _c), p in zip(images, names, strict=True)]}
        if self.control:
            columns[CONTROL_IMAGE_COLUMN] = [
                None if c is None else {"bytes": c, "path": control_name(self.row_ids[i])}
                for i, (_d, c) in zip(rows, images, strict=True)
            ]
        columns.update(self.describe(lo, hi))
        self._writer.write_table(pa.Table.from_pydict(columns, schema=self.schema))

    def _close(self) -> None:
        if self._rows:
            self._write_group(len(self._rows))
        self._writer.close()


def shard_writer(
    layout: str,
    store: Store,
    shard: int,
    attempt_id: str,
    row_ids: list[int],
    ext: str,
    *,
    describe: Describe,
    schema: pa.Schema,
    control: bool = False,
) -> ShardWriter:
    """The writer of one shard attempt's images for the job's ``layout`` (``control``: with
    each row's control map, ``--save-control``)."""
    if layout == LAYOUT_FILES:
        return FilesWriter(store, shard, attempt_id, row_ids, ext)
    out = defaults()["output"]
    args = (store, shard, attempt_id, row_ids, ext, describe, int(out["part_bytes"]))
    if layout == LAYOUT_WEBDATASET:
        return TarWriter(*args)
    return ParquetWriter(
        *args, schema=schema, row_group_rows=int(out["parquet_row_group_rows"]), control=control
    )
