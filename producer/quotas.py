"""Quotas: how many committed rows pass a filter, per value of a column, and which N to keep.

``producer topup JOB --until N [--per COLUMN] --where ...`` fills quotas, ``producer status``
shows how far they are, and ``producer finalize --per COLUMN --limit N`` keeps exactly N
passing rows per value. All three count the same way, here:

- the rows counted are the committed metadata rows that pass the ``--where`` conditions
  (finalize's :class:`producer.finalize.RowFilter`, passed in as ``passes``);
- the groups are the values of ``--per`` (a manifest column: a source field such as
  PartiPrompts' ``category``, ``source_row`` or ``prompt`` for a quota per prompt) among the
  job's enqueued prompts (round 0's manifests), so a value none of whose rows passed yet is
  short by the whole quota; without ``--per`` there is one group, ``all``;
- the N kept of a group are its passing rows ranked by the rank expression (highest first;
  the job's ``--rank-by`` unless another is given; none: row id order), then by row id.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fewstep import UserError
from fewstep.contract import (
    MANIFEST_CORE,
    job_candidates,
    job_rounds,
    manifest_key,
    metadata_key,
    parse_rank_by,
)
from fewstep.storage import Store

ALL = "all"  # the one group of a quota without --per
NULL = "(null)"  # the group of rows whose --per value is null


@dataclass(frozen=True)
class Quota:
    """``--until N [--per COLUMN] --where ...``, as recorded in ``job.json`` (``quota``)."""

    until: int
    per: str | None
    where: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        """The quota as ``job.json`` records it."""
        return {"until": self.until, "per": self.per, "where": list(self.where)}

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Quota | None:
        """The quota ``producer topup`` recorded in the job, or None."""
        q = spec.get("quota")
        return cls(int(q["until"]), q.get("per"), tuple(q.get("where") or ())) if q else None


def check_per(spec: dict[str, Any], per: str | None) -> None:
    """``--per`` must name a column every enqueued prompt has (a manifest column)."""
    if per is None:
        return
    columns = [*MANIFEST_CORE.names, *spec["source"].get("fields", {})]
    if per not in columns or per == "seed" or per == "row_id":
        usable = ", ".join(c for c in columns if c not in ("seed", "row_id"))
        raise UserError(f"--per {per!r}: not a column of this job's prompts (use one of: {usable})")


def group_labels(values: list) -> list[str]:
    """Group names of ``--per`` values (text, as JSON keys)."""
    return [NULL if v is None else str(v) for v in values]


def read_columns(
    store: Store, keys: list[str], columns: list[str] | None = None, threads: int = 16
) -> pa.Table:
    """The ``columns`` (None: all) of the parquet objects ``keys``, as one table."""

    def read(key: str) -> pa.Table:
        return pq.read_table(io.BytesIO(store.get(key)), columns=columns)

    if not keys:
        return pa.table({c: pa.array([], pa.null()) for c in columns or ()})
    with ThreadPoolExecutor(min(threads, len(keys))) as pool:
        return pa.concat_tables(list(pool.map(read, keys)), promote_options="default")


def enqueued_prompts(store: Store, spec: dict[str, Any], columns: list[str] | None = None) -> pa.Table:
    """Round 0's prompts (the enqueue's manifests; ``columns``, None: all): what quotas count
    groups of and top-up rounds draw from."""
    first = job_rounds(spec)[0]
    return read_columns(store, [manifest_key(s) for s in range(1, int(first["shards"]) + 1)], columns)


def quota_progress(
    store: Store,
    spec: dict[str, Any],
    committed: list[int],
    quota: Quota,
    passes: Callable[[pa.Table], pa.Table],
    filter_columns: list[str],
    threads: int = 16,
) -> dict[str, Any]:
    """Per group: committed rows (``generated``), those that pass (``passing``), and how many
    are still ``short`` of the quota; totals, and whether every quota is ``met``."""
    per = quota.per
    columns = sorted({"row_id", *filter_columns, *([per] if per else [])})
    table = read_columns(store, [metadata_key(s) for s in sorted(committed)], columns, threads)
    passed = passes(table) if table.num_rows else table
    if per:
        prompts = read_columns(
            store, [manifest_key(s) for s in range(1, int(job_rounds(spec)[0]["shards"]) + 1)], [per], threads
        )
        universe = sorted(set(group_labels(prompts.column(per).to_pylist())))
        generated = Counter(group_labels(table.column(per).to_pylist())) if table.num_rows else Counter()
        passing = Counter(group_labels(passed.column(per).to_pylist())) if passed.num_rows else Counter()
    else:
        universe = [ALL]
        generated, passing = Counter({ALL: table.num_rows}), Counter({ALL: passed.num_rows})
    groups = {
        g: {"generated": generated[g], "passing": passing[g], "short": max(quota.until - passing[g], 0)}
        for g in universe
    }
    short = sum(g["short"] for g in groups.values())
    return {
        **quota.describe(),
        "groups": groups,
        "generated": sum(generated.values()),
        "passing": sum(passing.values()),
        "short": short,
        "groups_met": sum(1 for g in groups.values() if not g["short"]),
        "met": short == 0,
    }


def rank_expression(spec: dict[str, Any], schema: pa.Schema, rank_by: str | None):
    """The expression finalize ranks rows by: ``rank_by``, else the job's ``--rank-by``, else None."""
    text = rank_by or (job_candidates(spec) or {}).get("rank_by")
    if not text:
        return None
    numeric = [f.name for f in schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)]
    return parse_rank_by(text, numeric)


def choose_per_limit(table: pa.Table, per: str, limit: int, rank=None) -> tuple[np.ndarray, dict[str, int]]:
    """The row ids of the ``limit`` best rows per ``per`` value of ``table`` (rows that passed):
    by ``rank`` (a :class:`fewstep.contract.RankBy`; highest first, a non-number last), then by
    row id; and how many each group kept."""
    rows = table.column("row_id").to_numpy()
    if rank is not None:
        values = rank.evaluate({n: table.column(n).to_pylist() for n in rank.names}, table.num_rows)
        key = np.where(np.isnan(values), np.inf, -values)
    else:
        key = np.zeros(len(rows))
    labels = np.array(group_labels(table.column(per).to_pylist()), dtype=object)
    order = np.lexsort((rows, key, labels.astype(str))) if len(rows) else np.array([], dtype=np.int64)
    kept: list[int] = []
    counts: dict[str, int] = {}
    for i in order:
        g = labels[i]
        if counts.get(g, 0) < limit:
            counts[g] = counts.get(g, 0) + 1
            kept.append(int(rows[i]))
    return np.sort(np.array(kept, dtype=np.int64)), counts


def pc_isin(table: pa.Table, row_ids: np.ndarray) -> pa.Array:
    """Mask of ``table``'s rows whose row id is in ``row_ids`` (sorted)."""
    return pc.is_in(table.column("row_id"), value_set=pa.array(row_ids, pa.int64()))


def per_limit_rows(
    store: Store,
    spec: dict[str, Any],
    schema: pa.Schema,
    shards: list[int],
    passes: Callable[[pa.Table], pa.Table],
    filter_columns: list[str],
    per: str,
    limit: int,
    rank_by: str | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """finalize's ``--per COLUMN --limit N``: the row ids of the N best passing rows of each
    value (:func:`choose_per_limit`), and what that kept per value (values short of N too)."""
    if per not in schema.names:
        raise UserError(f"--per {per!r}: not a metadata column of job {spec['job']}")
    rank = rank_expression(spec, schema, rank_by)
    columns = sorted({"row_id", *filter_columns, per, *(rank.names if rank else ())})
    passing = passes(read_columns(store, [metadata_key(s) for s in shards], columns))
    kept, counts = choose_per_limit(passing, per, limit, rank)
    short = {g: limit - n for g, n in sorted(counts.items()) if n < limit}
    summary = {
        "per": per,
        "limit": limit,
        "rank_by": rank.text if rank else None,
        "kept": counts,
        "short": short,
    }
    return kept, summary
