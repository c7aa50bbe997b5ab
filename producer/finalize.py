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

Filtering (:class:`RowFilter`): ``--where 'clip_score>=28'`` (enqueue's ``--where`` grammar,
``producer/selection.py``, on any numeric metadata column: scores, ``gen_ms``, numeric source
fields) keeps the rows for which every condition holds; a row with a null in a compared column
(a score the job did not compute) is removed by that condition. Conditions apply in the order
given, and each one's count is the rows it removed of those the earlier ones kept. Once
``producer dedupe`` has run, the dataset gets a ``near_duplicate_of`` column (null for kept
rows), and ``--drop-near-duplicates`` removes the rows it names, after the conditions. The
counts go into ``finalized.json`` (``filters``) and the card. Filtering changes
``metadata.parquet`` (and ``--json-parts``) only: a webdataset or parquet job's image objects
keep every row (the metadata's ``image_offset``/``image_row`` still point into them), so
``--webdataset`` (which would copy images) is refused together with a filter.
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
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fewstep import UserError
from fewstep.contract import (
    DATASET_CARD_KEY,
    FINALIZED_KEY,
    LAYOUT_FILES,
    LAYOUT_WEBDATASET,
    NEAR_DUPLICATE_COLUMN,
    WEBDATASET,
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
from producer.cost import cost_summary, gpu_price, read_stats
from producer.dedupe import read_near_duplicates
from producer.options import JSON, OUTPUT, job_store, progress_bar
from producer.progress import Progress, read_progress
from producer.quotas import pc_isin, per_limit_rows
from producer.selection import Condition, parse_where
from producer.tar_shards import part_tar

_DATASET_FILE = re.compile(r"metadata(-\d{5}-of-\d{5})?\.parquet")
_WEBDATASET_TAR = re.compile(rf"{WEBDATASET}/part-\d{{6}}\.tar")


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
        combined = pa.concat_tables(self._pending) if self._pending else self.schema.empty_table()
        group, rest = combined.slice(0, rows), combined.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._writer is None:
            self._tmp = tempfile.TemporaryFile()  # noqa: SIM115 - open across add() calls, closed in _upload
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        if group.num_rows:
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
        if self._pending_rows or (not self.keys and self._writer is None):
            # The rest; or, when a filter removed every row, an empty file: a dataset of no rows.
            self._write_group(self._pending_rows)
        if self._writer is not None:
            self._upload()
        return self.keys


def column_kinds(schema: pa.Schema, source_fields: dict[str, str]) -> dict[str, str]:
    """What ``--where`` may compare: numeric metadata columns by kind, source text fields as
    numbers in text (as enqueue does), any other column by a kind it refuses to compare."""
    kinds = {}
    for f in schema:
        if pa.types.is_integer(f.type):
            kinds[f.name] = "int64"
        elif pa.types.is_floating(f.type):
            kinds[f.name] = "float64"
        elif pa.types.is_boolean(f.type):
            kinds[f.name] = "bool"
        elif source_fields.get(f.name) == "string":
            kinds[f.name] = "string"
        else:
            kinds[f.name] = "text" if pa.types.is_string(f.type) else str(f.type)
    return kinds


class RowFilter:
    """finalize's filters: ``--where`` conditions in the order given, then near duplicates.

    ``near`` is near_duplicates.parquet (row_id → duplicate_of) when ``producer dedupe`` ran:
    each table gets the ``near_duplicate_of`` column from it, and with ``drop`` those rows go.
    """

    def __init__(
        self,
        conditions: list[Condition],
        near: pa.Table | None,
        drop: bool,
        per_limit: tuple[str, int, np.ndarray] | None = None,
    ):
        self.conditions = conditions
        self.near = near
        self.drop = drop
        # --per COLUMN --limit N: (column, N, the sorted row ids kept, chosen by choose_per_limit).
        self.per_limit = per_limit
        self.removed = [0] * len(conditions)
        self.dropped = self.limited = 0
        self.marked = 0
        if near is not None:
            near = near.sort_by("row_id")
            self.near_rows = near.column("row_id").to_numpy()
            self.near_of = near.column("duplicate_of").to_numpy()

    def fresh(self) -> RowFilter:
        """The same filter with its counts at zero."""
        return RowFilter(self.conditions, self.near, self.drop, self.per_limit)

    @property
    def active(self) -> bool:
        """Whether rows can be removed (else the row count is known before reading)."""
        return bool(self.conditions) or self.drop or self.per_limit is not None

    @property
    def columns(self) -> list[str]:
        """The columns the filter reads."""
        return sorted({"row_id", *(c.field for c in self.conditions)})

    def near_column(self, table: pa.Table) -> pa.Array:
        """Each row's ``near_duplicate_of``: the kept row it nearly repeats, or null."""
        rows = table.column("row_id").to_numpy()
        if not len(self.near_rows):
            return pa.nulls(len(rows), pa.int64())
        at = np.minimum(np.searchsorted(self.near_rows, rows), len(self.near_rows) - 1)
        return pa.array(self.near_of[at], pa.int64(), mask=self.near_rows[at] != rows)

    def apply(self, table: pa.Table) -> pa.Table:
        """``table`` with the near_duplicate_of column (when deduplicated), less the rows filtered out."""
        if self.near is not None:
            table = table.append_column(NEAR_DUPLICATE_COLUMN, self.near_column(table))
        for i, condition in enumerate(self.conditions):
            kept = table.filter(condition.mask(table))
            self.removed[i] += table.num_rows - kept.num_rows
            table = kept
        if self.near is not None:
            duplicate = table.column(NEAR_DUPLICATE_COLUMN).is_valid()
            self.marked += int(pc.sum(pc.cast(duplicate, pa.int64())).as_py() or 0)
            if self.drop:
                kept = table.filter(pc.invert(duplicate))
                self.dropped += table.num_rows - kept.num_rows
                table = kept
        if self.per_limit is not None:
            kept = table.filter(pc_isin(table, self.per_limit[2]))
            self.limited += table.num_rows - kept.num_rows
            table = kept
        return table

    def counts(self) -> list[dict[str, Any]]:
        """Each step and the rows it removed, for finalized.json and the card."""
        steps = [{"where": str(c), "removed": n} for c, n in zip(self.conditions, self.removed, strict=True)]
        if self.drop:
            steps.append({"drop_near_duplicates": True, "removed": self.dropped})
        if self.per_limit is not None:
            steps.append({"per": self.per_limit[0], "limit": self.per_limit[1], "removed": self.limited})
        return steps


def kept_rows(job_store: Store, shards: list[int], row_filter: RowFilter, threads: int) -> int:
    """How many rows the filter keeps (a first pass over only the columns it compares), so the
    dataset's files can be named ``-of-N`` before they are written."""
    counter = row_filter.fresh()

    def count(shard: int) -> int:
        return counter.apply(read_table(job_store, metadata_key(shard), row_filter.columns)).num_rows

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(count, shards))


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
    where: tuple[str, ...] = (),
    drop_near_duplicates: bool = False,
    per: str | None = None,
    limit: int | None = None,
    rank_by: str | None = None,
    on_shard: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Consolidate a job's committed shards; returns what was written (also saved as ``finalized.json``).

    ``where`` and ``drop_near_duplicates`` filter the rows (see the module's docstring).
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
    conditions = [parse_where(w, column_kinds(schema, spec["source"].get("fields", {})), "metadata column")
                  for w in where]  # fmt: skip
    near = read_near_duplicates(job_store)
    if near is not None and near[1].get("shards") != shards:
        raise UserError(
            f"near_duplicates.parquet of job {spec['job']} was made from other shards than the "
            f"{len(shards):,} committed now: run `producer dedupe {spec['job']}` again"
        )
    if drop_near_duplicates and near is None:
        raise UserError(
            f"job {spec['job']} has no near_duplicates.parquet: run `producer dedupe {spec['job']}` "
            "before --drop-near-duplicates"
        )
    row_filter = RowFilter(conditions, near[0] if near else None, drop_near_duplicates)
    per_limit = None
    if (per is None) != (limit is None):
        raise UserError("--per COLUMN and --limit N go together: N rows per value of COLUMN")
    if per is not None:
        passes = row_filter.fresh().apply
        kept, per_limit = per_limit_rows(
            job_store, spec, schema, shards, lambda t: passes(t), row_filter.columns, per, limit, rank_by
        )
        row_filter = RowFilter(conditions, row_filter.near, drop_near_duplicates, (per, limit, kept))
    if webdataset and row_filter.active:
        raise UserError(
            "--webdataset copies every committed image: use it without --where/--drop-near-duplicates"
        )
    read_schema = schema
    if near is not None:
        schema = schema.append(pa.field(NEAR_DUPLICATE_COLUMN, pa.int64()))
    schema = schema.with_metadata({"fewstep.job": json.dumps(spec, ensure_ascii=False)})
    committed_rows = sum(shard_rows(spec, s) for s in shards)
    total_rows = kept_rows(job_store, shards, row_filter, threads) if row_filter.active else committed_rows
    files = MetadataFiles(job_store, schema, total_rows, int(cfg["row_group_rows"]), int(cfg["file_rows"]))
    facts = Facts()
    tars: list[str] = []
    image_files: list[str] = []  # webdataset and parquet layouts: each committed part's object
    tables = committed_tables(job_store, shards, read_schema, threads)
    for done, (shard, table) in enumerate(zip(shards, tables, strict=True), start=1):
        if table.num_rows != shard_rows(spec, shard):
            raise UserError(
                f"{metadata_key(shard)} has {table.num_rows} rows, its manifest {shard_rows(spec, shard)}: "
                "run `producer verify` on this job"
            )
        table = row_filter.apply(table)
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
    for key, _size in list(job_store.list(f"{WEBDATASET}/")):
        if _WEBDATASET_TAR.fullmatch(key) and key not in tars:
            # An earlier finalize --webdataset's: finalized.json lists the dataset's tars, and a
            # tar it does not list would hold rows a --where of this finalize dropped.
            job_store.delete(key)

    def when(t: dt.datetime | None) -> str | None:
        return t.isoformat(timespec="seconds") if t else None

    summary = {
        "job": spec["job"],
        "job_url": job_store.url,
        "finalized_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "partial": bool(missing),
        "rows": facts.rows,
        "committed_rows": committed_rows,
        "filters": row_filter.counts(),
        "per_limit": per_limit,
        "near_duplicates": (
            {
                "rows": row_filter.marked,
                "dropped": drop_near_duplicates,
                "threshold": near[1].get("threshold"),
            }
            if near is not None
            else None
        ),
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
        "cost": cost_summary(read_stats(job_store), gpu_price()),  # priced by config/defaults.toml [cost]
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
@click.option(
    "--where",
    multiple=True,
    metavar="COLUMN<OP>NUMBER",
    help="Keep rows whose metadata column compares so, e.g. 'clip_score>=28' (repeatable; all hold; "
    "a null removes the row).",
)
@click.option(
    "--drop-near-duplicates",
    is_flag=True,
    help="Leave out the rows `producer dedupe` found to nearly repeat a kept row.",
)
@click.option(
    "--per", metavar="COLUMN", help="With --limit: keep N rows per value of this column (category)."
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    metavar="N",
    help="With --per: the N passing rows of each value ranked best (--rank-by), then by row id.",
)
@click.option(
    "--rank-by",
    metavar="EXPR",
    help="How --per/--limit ranks rows, higher first (score columns, + - * /) [the job's --rank-by; "
    "none: row id].",
)
@JSON
def finalize_command(
    job: str,
    output: str,
    partial: bool,
    json_parts: bool,
    webdataset: bool,
    where: tuple[str, ...],
    drop_near_duplicates: bool,
    per: str | None,
    limit: int | None,
    rank_by: str | None,
    as_json: bool,
):
    """Consolidate JOB's committed shards into metadata.parquet with a dataset card (README.md).

    Refuses a job with shards not committed unless --partial (which says what is missing).
    --where and --drop-near-duplicates filter the rows; the card says how many each removed.
    """
    store = job_store(output, job)
    with progress_bar("finalize: shards") as on_shard:
        summary = finalize(
            store,
            partial=partial,
            json_parts=json_parts,
            webdataset=webdataset,
            where=where,
            drop_near_duplicates=drop_near_duplicates,
            per=per,
            limit=limit,
            rank_by=rank_by,
            on_shard=on_shard,
        )
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"finalized {summary['job']}: {summary['rows']:,} rows from {summary['shards']:,} shards "
        f"into {', '.join(summary['files'])}; card {summary['card']}"
    )
    for step in summary["filters"]:
        what = step.get("where") or (
            f"{step['limit']} per {step['per']}" if "per" in step else "near duplicates"
        )
        click.echo(f"filter {what}: removed {step['removed']:,} of {summary['committed_rows']:,} rows")
    if summary["webdataset"] and summary["layout"] == LAYOUT_WEBDATASET:
        click.echo(
            f"webdataset: the job's own {len(summary['webdataset']):,} tar shards, one per shard under "
            f"{store.url}/images/ (finalized.json lists them)"
        )
    elif summary["webdataset"]:
        click.echo(f"webdataset: {len(summary['webdataset']):,} tar shards under {store.url}/{WEBDATASET}/")
    if summary["per_limit"] and summary["per_limit"]["short"]:
        short = summary["per_limit"]["short"]
        click.echo(
            f"short of --limit: {len(short):,} values ({', '.join(list(short)[:5])}...): `producer topup`"
        )
    if summary["partial"]:
        click.echo(f"partial: {summary['missing_rows']:,} prompts missing in {summary['missing']}")
