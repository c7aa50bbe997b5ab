"""Rows into shards: global row ids, seeds, and one manifest parquet per shard."""

from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fewstep.contract import derive_seeds, manifest_key, manifest_schema
from fewstep.storage import Store


def manifest_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


@dataclass
class ShardWriter:
    """Cuts a stream of source batches into shards of ``shard_size`` rows.

    Each row gets its global ``row_id`` (0-based, in order) and a seed: the source's own
    when the batch has a ``seed`` column, else derived from (job seed, source row).
    Manifests are uploaded in parallel; with no store it only counts (dry runs).
    """

    fields: dict[str, str]
    shard_size: int
    job_seed: int
    store: Store | None = None
    threads: int = 16
    prompts: int = 0
    shards: int = 0
    _pending: list[pa.RecordBatch] = field(default_factory=list)
    _pending_rows: int = 0
    _futures: list[Future] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.schema = manifest_schema(self.fields)
        self._pool = ThreadPoolExecutor(self.threads) if self.store is not None else None

    def add(self, batch: pa.RecordBatch) -> None:
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
        if "seed" in batch.schema.names:
            seed = batch.column("seed").cast(pa.uint32())
        else:
            seed = pa.array(derive_seeds(self.job_seed, source_row.to_numpy(zero_copy_only=False)))
        columns = {"row_id": row_id, "source_row": source_row, "prompt": batch.column("prompt"), "seed": seed}
        for name in self.fields:
            columns[name] = batch.column(name)
        return pa.RecordBatch.from_pydict(columns, schema=self.schema)

    def _cut(self, rows: int) -> None:
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        shard, rest = table.slice(0, rows), table.slice(rows)
        self._pending = rest.combine_chunks().to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self.shards += 1
        if self._pool is not None:
            self._futures.append(self._pool.submit(self._write, self.shards, shard))
            self._drain(limit=4 * self.threads)

    def _write(self, shard: int, table: pa.Table) -> None:
        assert self.store is not None
        self.store.put(manifest_key(shard), manifest_bytes(table.combine_chunks()))

    def _drain(self, limit: int = 0) -> None:
        # Bounded: at most `limit` manifests in flight, so memory stays flat.
        while len(self._futures) > limit:
            self._futures.pop(0).result()

    def close(self) -> None:
        """Write the last, partial shard and wait for every upload."""
        if self._pending_rows:
            self._cut(self._pending_rows)
        try:
            self._drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)


def limit_batches(batches, limit: int | None):
    """At most ``limit`` rows from a stream of batches."""
    if limit is None:
        yield from batches
        return
    left = limit
    for batch in batches:
        if left <= 0:
            return
        if batch.num_rows > left:
            batch = batch.slice(0, left)
        left -= batch.num_rows
        yield batch


def drop_empty(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, int]:
    """The batch without rows whose prompt is null, empty or only whitespace, and how many."""
    prompt = batch.column("prompt")
    keep = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(prompt)), 0)
    keep = pc.fill_null(keep, False)
    kept = batch.filter(keep)
    return kept, batch.num_rows - kept.num_rows
