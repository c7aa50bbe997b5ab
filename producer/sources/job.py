"""Another fewstep job's committed rows: ``producer enqueue job SOURCE_JOB`` (chained jobs).

The source job lives under the same ``--output`` (the workers already have its credentials).
Its committed metadata is read shard by shard, in row order; each row becomes a row of the new
job with

- ``prompt``: the source row's prompt, byte for byte;
- ``source_row``: the source job's ``row_id`` (so seeds derive from it);
- the source job's own fields (``category``, ...), and ``parent_source_row``: the row of the
  original prompt set the source job read;
- as its conditioning image, the source row's committed image, by reference in any layout:
  the image object (files), a byte span of the shard's tar (webdataset: ``cond_offset``,
  ``cond_length``) or a row of the shard's parquet (``cond_row``); ``cond_sha256`` is the
  source row's ``sha256`` (the worker checks it), ``cond_source`` reads ``job:NAME/row N``.

An unfinished source job is refused, naming how many shards and rows are not committed yet;
``--partial`` takes the committed shards only (the count of rows left out is in the spec's
``source.rows_not_committed``, and the enqueue says it).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from fewstep import UserError
from fewstep.contract import (
    FIELD_TYPES,
    LAYOUT_FILES,
    LAYOUT_WEBDATASET,
    check_job_name,
    job_layout,
    metadata_key,
)
from fewstep.storage import LocalStore, Store, open_store, read_table
from producer.image_refs import REF_COLUMNS, REF_SCHEMA
from producer.progress import read_progress
from producer.sources import PromptSource

PARENT_ROW = "parent_source_row"
_READ_AHEAD = 8


def object_url(store: Store, key: str) -> str:
    """The URL a worker reads ``key`` of ``store`` by: ``s3://bucket/key`` or ``file:///path``."""
    if isinstance(store, LocalStore):
        return "file://" + str(store.root / key)
    return store.url_of(key)


class JobSource(PromptSource):
    """The committed rows of job ``job`` under ``output``, with their images as conditioning."""

    name = "job"

    def __init__(self, output: str, job: str, *, partial: bool = False):
        super().__init__()
        if "/" in job or "://" in job:
            raise UserError(f"SOURCE_JOB {job!r}: give the name of a job under --output, not a path or URL")
        check_job_name(job)
        root = open_store(output)
        root.check()
        self.job = job
        self.store = root.child(job)
        progress = read_progress(self.store)
        self.spec = progress.spec
        self.layout = job_layout(self.spec)
        self.shards = sorted(progress.committed)
        total = progress.summary()["images_total"]  # --keep all: K rows a prompt
        self.total_rows = progress.images_done
        self.rows_not_committed = total - progress.images_done
        if self.rows_not_committed and not partial:
            raise UserError(
                f"job {job} is not finished: {len(self.shards)} of {progress.shards_total} shards committed, "
                f"{self.rows_not_committed:,} rows not yet there; wait for it, or pass --partial to take "
                "the committed rows only"
            )
        if not self.shards:
            raise UserError(f"job {job} has no committed shards yet: nothing to take")
        self.parent_fields = dict(self.spec["source"].get("fields", {}))
        self.parent_row = PARENT_ROW
        while self.parent_row in self.parent_fields:  # a chain of chains: the grandparent's is kept
            self.parent_row = "parent_" + self.parent_row
        self.fields = {**self.parent_fields, self.parent_row: "int64"}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "job": self.job,
            "job_url": self.store.url,
            "model": self.spec["model"]["name"],
            "layout": self.layout,
            "shards": len(self.shards),
            "rows": self.total_rows,
            "rows_not_committed": self.rows_not_committed,
            "fields": self.fields,
        }

    def _columns(self) -> list[str]:
        where = {LAYOUT_FILES: [], LAYOUT_WEBDATASET: ["image_offset"]}.get(self.layout, ["image_row"])
        return ["row_id", "source_row", "prompt", "image_key", "sha256", "bytes", *where, *self.parent_fields]

    def _read(self, shard: int) -> pa.Table:
        return read_table(self.store, metadata_key(shard), self._columns()).sort_by("row_id")

    def batches(self) -> Iterator[pa.RecordBatch]:
        with ThreadPoolExecutor(_READ_AHEAD, thread_name_prefix="source-job") as pool:
            for start in range(0, len(self.shards), _READ_AHEAD):
                for table in pool.map(self._read, self.shards[start : start + _READ_AHEAD]):
                    yield self._batch(table)

    def _batch(self, table: pa.Table) -> pa.RecordBatch:
        n = table.num_rows
        keys = table.column("image_key").to_pylist()
        urls = {key: object_url(self.store, key) for key in set(keys)}
        nulls = pa.nulls(n, pa.int64())
        refs = {
            "cond_ref": pa.array([urls[k] for k in keys], pa.string()),
            "cond_offset": table.column("image_offset") if self.layout == LAYOUT_WEBDATASET else nulls,
            "cond_length": table.column("bytes") if self.layout == LAYOUT_WEBDATASET else nulls,
            "cond_row": nulls
            if self.layout in (LAYOUT_FILES, LAYOUT_WEBDATASET)
            else table.column("image_row"),
            "cond_sha256": table.column("sha256"),
            "cond_source": pc.binary_join_element_wise(
                f"job:{self.job}/row ", pc.cast(table.column("row_id"), pa.string()), ""
            ),
        }
        columns = {
            "source_row": table.column("row_id"),
            "prompt": table.column("prompt"),
            **{name: table.column(name).cast(FIELD_TYPES[t]) for name, t in self.parent_fields.items()},
            self.parent_row: table.column("source_row"),
            **{name: pa.chunked_array(refs[name]).cast(REF_SCHEMA.field(name).type) for name in REF_COLUMNS},
        }
        return pa.Table.from_pydict(columns).combine_chunks().to_batches(max_chunksize=max(n, 1))[0]
