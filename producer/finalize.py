"""``producer finalize``: the committed shards of a job as one dataset that loads in one line.

The metadata of every committed part (``metadata/part-N.parquet``, the commit markers) is
streamed in row order into ``metadata.parquet`` (split into ``metadata-0000i-of-0000n``
files past ``[finalize] file_rows`` rows) with the job's one schema, together with a
dataset card (``README.md``) and ``finalized.json``. Optionally DiffusionDB-style
``part-NNNNNN.json`` prompt files next to each part's images, and WebDataset tar shards.

A webdataset or parquet job's images stay where the worker wrote them, one tar or parquet
per committed part (``image_files`` in ``finalized.json`` and the card list them: losing
attempts' objects lie next to them until ``producer gc``, so load that list, not a glob);
``--webdataset`` on a webdataset job writes nothing more, its tars are the shards.

Only committed shards are read. A job with shards not committed is refused unless
``--partial``, which names what is missing, in the output and in the card.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import click
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fewstep import UserError
from fewstep.contract import (
    DATASET_CARD_KEY,
    FINALIZED_KEY,
    LAYOUT_FILES,
    LAYOUT_WEBDATASET,
    dataset_metadata_key,
    job_layout,
    job_metadata_schema,
    json_part_key,
    metadata_key,
    part_name,
    shard_rows,
    webdataset_key,
)
from fewstep.settings import defaults
from fewstep.storage import Store, read_table
from producer.card import dataset_card
from producer.options import JSON, OUTPUT, job_store, progress_bar
from producer.progress import Progress, read_progress
from producer.tar_shards import part_tar

_DATASET_FILE = re.compile(r"metadata(-\d{5}-of-\d{5})?\.parquet")


def describe_missing(progress: Progress, limit: int = 10) -> str:
    """``2 failed (part-000003, part-000007), 1 not yet committed (part-000009)``."""

    def names(shards: list[int]) -> str:
        shown = ", ".join(part_name(s) for s in shards[:limit])
        return shown + (f", … {len(shards) - limit} more" if len(shards) > limit else "")

    failed = sorted(progress.failed)
    open_ = progress.open_shards
    parts = []
    if failed:
        parts.append(f"{len(failed)} failed ({names(failed)})")
    if open_:
        parts.append(f"{len(open_)} not yet committed ({names(open_)})")
    return ", ".join(parts)


def diffusiondb_part(table: pa.Table) -> bytes:
    """DiffusionDB's per-part JSON: image name → prompt, seed, cfg, steps, sampler."""
    columns = table.select(["image_name", "prompt", "seed", "cfg", "step", "sampler"]).to_pydict()
    entries = {
        name: {"p": p, "se": se, "c": c, "st": st, "sa": sa}
        for name, p, se, c, st, sa in zip(*columns.values(), strict=True)
    }
    return json.dumps(entries, ensure_ascii=False, indent=1).encode()


@dataclass
class Facts:
    """What finalize saw while streaming the rows: for the card and ``finalized.json``."""

    rows: int = 0
    image_bytes: int = 0
    truncated: int = 0
    nsfw: int = 0
    workers: set[str] = field(default_factory=set)
    first_created: dt.datetime | None = None
    last_created: dt.datetime | None = None

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self.image_bytes += int(pc.sum(table["bytes"]).as_py() or 0)
        self.truncated += int(pc.sum(pc.cast(table["truncated"], pa.int64())).as_py() or 0)
        self.nsfw += int(pc.sum(pc.cast(table["nsfw"], pa.int64())).as_py() or 0)
        self.workers.update(w for w in pc.unique(table["worker"]).to_pylist() if w)
        low, high = pc.min(table["created_at"]).as_py(), pc.max(table["created_at"]).as_py()
        if low and (self.first_created is None or low < self.first_created):
            self.first_created = low
        if high and (self.last_created is None or high > self.last_created):
            self.last_created = high


class MetadataFiles:
    """Row groups of ``row_group_rows`` into files of at most ``file_rows`` rows, uploaded as they fill."""

    def __init__(
        self, job_store: Store, schema: pa.Schema, total_rows: int, row_group_rows: int, file_rows: int
    ):
        self.job_store = job_store
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.file_rows = file_rows
        self.files = max(1, -(-total_rows // file_rows))
        self.keys: list[str] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._file_rows = 0
        self._tmp = None
        self._writer: pq.ParquetWriter | None = None

    def add(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= min(self.row_group_rows, self.file_rows - self._file_rows):
            self._write_group(min(self.row_group_rows, self.file_rows - self._file_rows))

    def _write_group(self, rows: int) -> None:
        combined = pa.concat_tables(self._pending)
        group, rest = combined.slice(0, rows), combined.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._writer is None:
            self._tmp = tempfile.TemporaryFile()  # noqa: SIM115 - open across add() calls, closed in _upload
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._writer.write_table(group, row_group_size=rows)
        self._file_rows += group.num_rows
        if self._file_rows >= self.file_rows:
            self._upload()

    def _upload(self) -> None:
        self._writer.close()
        self._tmp.seek(0)
        key = dataset_metadata_key(len(self.keys) + 1, self.files)
        self.job_store.put(key, self._tmp.read())
        self._tmp.close()
        self.keys.append(key)
        self._writer, self._tmp, self._file_rows = None, None, 0

    def close(self) -> list[str]:
        if self._pending_rows:
            self._write_group(self._pending_rows)
        if self._writer is not None:
            self._upload()
        return self.keys


def committed_tables(
    job_store: Store, shards: list[int], schema: pa.Schema, threads: int
) -> Iterator[pa.Table]:
    """Each committed part's metadata in shard order, checked against the job's schema; read ahead
    a window at a time so memory stays bounded."""

    def read(shard: int) -> pa.Table:
        table = read_table(job_store, metadata_key(shard))
        if table.schema.names != schema.names:
            raise UserError(
                f"{metadata_key(shard)} has columns {table.schema.names}, not the job's schema {schema.names}"
            )
        return table.cast(schema).sort_by("row_id")

    window = max(threads * 2, 1)
    with ThreadPoolExecutor(threads) as pool:
        for lo in range(0, len(shards), window):
            yield from pool.map(read, shards[lo : lo + window])


def finalize(
    job_store: Store,
    *,
    partial: bool = False,
    json_parts: bool = False,
    webdataset: bool = False,
    on_shard: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Consolidate a job's committed shards; returns what was written (also saved as ``finalized.json``).

    ``on_shard(done, total)`` is called after each shard, for a progress bar.
    """
    cfg = defaults()["finalize"]
    threads = int(cfg["threads"])
    progress = read_progress(job_store)
    spec = progress.spec
    shards = sorted(progress.committed)
    missing = [s for s in range(1, progress.shards_total + 1) if s not in progress.committed]
    if missing and not partial:
        raise UserError(
            f"job {spec['job']} is incomplete: {len(missing)} of {progress.shards_total} shards "
            "not committed, "
            f"{describe_missing(progress)}; finish it, or finalize the committed shards with --partial"
        )
    if not shards:
        raise UserError(f"job {spec['job']} has no committed shard yet: nothing to finalize")

    layout = job_layout(spec)
    schema = job_metadata_schema(spec)
    schema = schema.with_metadata({"fewstep.job": json.dumps(spec, ensure_ascii=False)})
    total_rows = sum(shard_rows(spec, s) for s in shards)
    files = MetadataFiles(job_store, schema, total_rows, int(cfg["row_group_rows"]), int(cfg["file_rows"]))
    facts = Facts()
    tars: list[str] = []
    image_files: list[str] = []  # webdataset and parquet layouts: each committed part's object
    tables = committed_tables(job_store, shards, schema, threads)
    for done, (shard, table) in enumerate(zip(shards, tables, strict=True), start=1):
        if table.num_rows != shard_rows(spec, shard):
            raise UserError(
                f"{metadata_key(shard)} has {table.num_rows} rows, its manifest {shard_rows(spec, shard)}: "
                "run `producer verify` on this job"
            )
        facts.add(table)
        files.add(table)
        if json_parts:
            job_store.put(json_part_key(shard), diffusiondb_part(table))
        if layout != LAYOUT_FILES:
            image_files.extend(sorted(set(table.column("image_key").to_pylist())))
        if webdataset and layout == LAYOUT_WEBDATASET:
            tars.extend(sorted(set(table.column("image_key").to_pylist())))  # the worker's tars
        elif webdataset:
            key = webdataset_key(shard)
            if not job_store.exists(key):  # a committed part never changes, nor does its tar
                job_store.put(key, part_tar(job_store, table, layout, threads))
            tars.append(key)
        if on_shard:
            on_shard(done, len(shards))
    keys = files.close()
    for key, _size in list(job_store.list("metadata")):
        if _DATASET_FILE.fullmatch(key) and key not in keys:
            job_store.delete(key)  # left by an earlier finalize that split the rows differently

    def when(t: dt.datetime | None) -> str | None:
        return t.isoformat(timespec="seconds") if t else None

    summary = {
        "job": spec["job"],
        "job_url": job_store.url,
        "finalized_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "partial": bool(missing),
        "rows": facts.rows,
        "shards": len(shards),
        "shards_total": progress.shards_total,
        "missing_shards": missing,
        "missing_rows": sum(shard_rows(spec, s) for s in missing),
        "missing": describe_missing(progress) if missing else None,
        "files": keys,
        "layout": layout,
        "image_files": image_files,
        "card": DATASET_CARD_KEY,
        "json_parts": json_parts,
        "webdataset": tars,
        "image_bytes": facts.image_bytes,
        "truncated": facts.truncated,
        "nsfw": facts.nsfw,
        "workers": len(facts.workers),
        "first_created": when(facts.first_created),
        "last_created": when(facts.last_created),
    }
    job_store.put(DATASET_CARD_KEY, dataset_card(spec, summary).encode())
    job_store.put(FINALIZED_KEY, json.dumps(summary, indent=2).encode())
    return summary


@click.command("finalize")
@click.argument("job")
@OUTPUT
@click.option("--partial", is_flag=True, help="Finalize the committed shards of an unfinished job.")
@click.option(
    "--json-parts",
    is_flag=True,
    help="Also write DiffusionDB-style part-NNNNNN.json next to each part's images.",
)
@click.option(
    "--webdataset", is_flag=True, help="Also write WebDataset tar shards (webdataset/part-NNNNNN.tar)."
)
@JSON
def finalize_command(job: str, output: str, partial: bool, json_parts: bool, webdataset: bool, as_json: bool):
    """Consolidate JOB's committed shards into metadata.parquet with a dataset card (README.md).

    Refuses a job with shards not committed unless --partial (which says what is missing).
    """
    store = job_store(output, job)
    with progress_bar("finalize: shards") as on_shard:
        summary = finalize(
            store, partial=partial, json_parts=json_parts, webdataset=webdataset, on_shard=on_shard
        )
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"finalized {summary['job']}: {summary['rows']:,} rows from {summary['shards']:,} shards "
        f"into {', '.join(summary['files'])}; card {summary['card']}"
    )
    if summary["webdataset"]:
        click.echo(f"webdataset: {len(summary['webdataset']):,} tar shards under {store.url}/webdataset/")
    if summary["partial"]:
        click.echo(f"partial: {summary['missing_rows']:,} prompts missing in {summary['missing']}")
