"""Rows into shards: global row ids, seeds, and one manifest parquet per shard (and, for a
conditioned job whose source held image bytes, one sidecar parquet of those bytes per shard)."""

from __future__ import annotations

import io
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fewstep.contract import (
    IMAGE_STRUCT,
    condition_images_key,
    derive_seeds,
    manifest_key,
    manifest_schema,
)
from fewstep.storage import Store
from producer.image_refs import BYTES_COLUMN, REF_COLUMNS


def manifest_bytes(table: pa.Table) -> bytes:
    """A shard's manifest as parquet bytes (one row group).

    Snappy, no dictionaries, no statistics: a manifest is read once, whole, by a worker,
    and encoding thousands of them is a large part of an enqueue's CPU time.
    """
    buffer = io.BytesIO()
    pq.write_table(
        table,
        buffer,
        compression="snappy",
        use_dictionary=False,
        write_statistics=False,
        row_group_size=max(table.num_rows, 1),
    )
    return buffer.getvalue()


class ShardWriter:
    """Cuts a stream of selected source batches into shards of ``shard_size`` rows.

    Each row gets its global ``row_id`` (0-based, in order) and a seed: the source's own
    when the batch has a ``seed`` column (null seeds are derived), else derived from (job
    seed, source row). Slicing is zero-copy; manifests are encoded and uploaded by a
    thread pool, at most ``4 × threads`` at a time, so memory stays flat. With no store
    it only counts (dry runs).

    ``conditioned``: the batches carry the reference columns of :mod:`producer.image_refs`
    (and the image bytes a source held, which go to the shard's sidecar, written before its
    manifest, never into the manifest).
    """

    def __init__(
        self,
        fields: dict[str, str],
        shard_size: int,
        job_seed: int,
        store: Store | None = None,
        threads: int = 16,
        conditioned: bool = False,
    ):
        self.fields = fields
        self.shard_size = shard_size
        self.job_seed = job_seed
        self.store = store
        self.conditioned = conditioned
        self.manifest_schema = manifest_schema(fields, conditioned)
        self.schema = (
            pa.schema([*self.manifest_schema, pa.field(BYTES_COLUMN, IMAGE_STRUCT)])
            if conditioned
            else self.manifest_schema
        )
        self.prompts = 0
        self.shards = 0
        self._pending: deque[pa.RecordBatch] = deque()
        self._pending_rows = 0
        self._futures: deque[Future] = deque()
        self._limit = 4 * threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="manifest") if store is not None else None

    def add(self, batch: pa.RecordBatch) -> None:
        """Append rows; every full shard is cut and sent to storage."""
        if batch.num_rows == 0:
            return
        self._pending.append(self._conform(batch))
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self.shard_size:
            self._cut(self.shard_size)

    def _conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        n = batch.num_rows
        row_id = pa.array(np.arange(self.prompts, self.prompts + n, dtype=np.int64))
        self.prompts += n
        source_row = batch.column("source_row").cast(pa.int64())
        names = batch.schema.names
        if "seed" in names and batch.column("seed").null_count == 0:
            seed = batch.column("seed").cast(pa.uint32())
        else:
            derived = pa.array(derive_seeds(self.job_seed, source_row.to_numpy()))
            seed = (
                pc.coalesce(batch.column("seed").cast(pa.uint32()), derived) if "seed" in names else derived
            )
        columns = [row_id, source_row, batch.column("prompt"), seed]
        columns += [batch.column(name) for name in self.fields]
        if self.conditioned:
            columns += [batch.column(name) for name in (*REF_COLUMNS, BYTES_COLUMN)]
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def _cut(self, rows: int) -> None:
        pieces = []
        while rows:
            head = self._pending[0]
            if head.num_rows <= rows:
                pieces.append(self._pending.popleft())
                rows -= head.num_rows
            else:
                pieces.append(head.slice(0, rows))
                self._pending[0] = head.slice(rows)
                rows = 0
        table = pa.Table.from_batches(pieces, schema=self.schema)
        self._pending_rows -= table.num_rows
        self.shards += 1
        if self._pool is not None:
            self._futures.append(self._pool.submit(self._write, self.shards, table))
            self._drain(self._limit)

    def _write(self, shard: int, table: pa.Table) -> None:
        assert self.store is not None
        if self.conditioned:
            table = self._sidecar(shard, table)
        self.store.put(manifest_key(shard), manifest_bytes(table))

    def _sidecar(self, shard: int, table: pa.Table) -> pa.Table:
        """Store the shard's image bytes (if any) in its sidecar; the manifest then names them."""
        images = table.column(BYTES_COLUMN)
        table = table.drop_columns([BYTES_COLUMN])
        held = pc.is_valid(images)
        if not pc.any(held).as_py():
            return table
        sidecar = pa.table({"row_id": table.column("row_id").filter(held), "image": images.filter(held)})
        self.store.put(condition_images_key(shard), manifest_bytes(sidecar))
        position = pc.subtract(pc.cumulative_sum(pc.cast(held, pa.int64())), 1)
        ref = pc.if_else(held, pa.scalar(condition_images_key(shard)), table.column("cond_ref"))
        row = pc.if_else(held, position, table.column("cond_row"))
        table = table.set_column(table.schema.get_field_index("cond_ref"), "cond_ref", ref)
        return table.set_column(table.schema.get_field_index("cond_row"), "cond_row", row)

    def _drain(self, limit: int = 0) -> None:
        while len(self._futures) > limit:
            self._futures.popleft().result()

    def close(self) -> None:
        """Write the last, partial shard and wait for every upload."""
        if self._pending_rows:
            self._cut(self._pending_rows)
        try:
            self._drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Stop uploading (after an error): queued manifests are dropped, running ones finish."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
