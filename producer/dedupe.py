"""``producer dedupe``: near-duplicate images across a whole job, from their CLIP image embeddings.

The worker writes each image's L2-normalised CLIP embedding (``--embeddings``) to
``embeddings/part-N/<attempt-id>.parquet``; the committed metadata's ``attempt_id`` names the
object that counts for each shard. Two images are near duplicates when the cosine similarity
of their embeddings (their inner product) is at least ``--threshold``.

Search is faiss (``faiss-cpu``), never an all-pairs loop in Python: up to ``[dedupe] exact_max``
embeddings an exact flat index (every pair compared), above it an IVF index whose vectors are
stored as float16 (``IndexIVFScalarQuantizer``, ``QT_fp16``: the embeddings' own precision, half
the memory of float32), with ``lists_per_sqrt × √rows`` lists of which ``nprobe`` are searched
per query. The IVF search is approximate: a pair whose two images fall in lists that are not
probed is missed (recall is measured in docs/BENCHMARKS.md).

Grouping is greedy in row order: the smallest row id of a group is kept, and every later row
whose similarity *to that kept row* reaches the threshold points to it. So each listed
``similarity`` is to the row kept, never a chain (A~B, B~C does not make C a duplicate of A
unless C~A); a row similar only to a row that is itself a duplicate is kept.

The result is ``near_duplicates.parquet`` at the job root (``row_id``, ``duplicate_of``,
``similarity``; the threshold, method and the shards it covers in its schema metadata), which
``producer finalize`` turns into the ``near_duplicate_of`` column (``--drop-near-duplicates``
leaves those rows out).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fewstep import UserError
from fewstep.contract import NEAR_DUPLICATES_KEY, NEAR_DUPLICATES_SCHEMA
from fewstep.settings import defaults
from fewstep.storage import Store, read_table
from producer.embeddings import read_embeddings
from producer.options import JSON, OUTPUT, job_store
from producer.progress import read_progress

#: Schema metadata key of near_duplicates.parquet holding how it was made.
DEDUPE_META = b"fewstep.dedupe"


@dataclass(frozen=True)
class SearchSettings:
    """How the near neighbours are searched: ``[dedupe]`` in config/defaults.toml says what each is."""

    exact_max: int
    lists_per_sqrt: float
    nprobe: int
    train_per_list: int
    kmeans_iterations: int
    query_batch: int
    threads: int

    @classmethod
    def from_config(cls) -> SearchSettings:
        cfg = defaults()["dedupe"]
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__})


def build_index(vectors: np.ndarray, settings: SearchSettings) -> tuple[Any, dict[str, Any]]:
    import faiss  # only this command needs it; keeps the CLI's start quick

    if settings.threads:
        faiss.omp_set_num_threads(settings.threads)
    n, dim = vectors.shape
    if n <= settings.exact_max:
        index = faiss.IndexFlatIP(dim)
        how: dict[str, Any] = {"method": "exact", "index": "IndexFlatIP"}
    else:
        lists = max(1, min(round(settings.lists_per_sqrt * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim),
            dim,
            lists,
            faiss.ScalarQuantizer.QT_fp16,
            faiss.METRIC_INNER_PRODUCT,
            False,
        )
        index.cp.niter = settings.kmeans_iterations
        rng = np.random.default_rng(0)  # the same training sample every run: the same result
        train = min(n, lists * settings.train_per_list)
        sample = np.sort(rng.choice(n, train, replace=False)) if train < n else np.arange(n)
        index.train(vectors[sample].astype(np.float32))
        index.nprobe = min(settings.nprobe, lists)
        how = {
            "method": "approximate",
            "index": "IndexIVFScalarQuantizer(fp16)",
            "lists": lists,
            "nprobe": index.nprobe,
            "trained_on": int(train),
        }
    for lo in range(0, n, settings.query_batch):
        index.add(vectors[lo : lo + settings.query_batch].astype(np.float32))
    return index, how


def similar_pairs(
    vectors: np.ndarray, threshold: float, settings: SearchSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Every pair (a < b, by position) whose inner product is at least ``threshold``, once, with
    its similarity; and how the search was made."""
    index, how = build_index(vectors, settings)
    return (*search(index, vectors, threshold, settings.query_batch), how)


def search(
    index: Any, vectors: np.ndarray, threshold: float, query_batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs (a < b) of ``vectors`` in ``index`` at or above ``threshold``, once each."""
    firsts, seconds, sims = [], [], []
    # faiss keeps results strictly above the radius; a hair below, then the exact test here.
    radius = float(threshold) - 1e-4
    for lo in range(0, len(vectors), query_batch):
        queries = vectors[lo : lo + query_batch].astype(np.float32)
        lims, found_sims, found = index.range_search(queries, radius)
        query = np.repeat(np.arange(lo, lo + len(queries)), np.diff(lims).astype(np.int64))
        keep = (found != query) & (found_sims >= threshold)
        a, b = query[keep], found[keep]
        firsts.append(np.minimum(a, b))
        seconds.append(np.maximum(a, b))
        sims.append(found_sims[keep])
    a, b, s = (np.concatenate(x) if x else np.empty(0) for x in (firsts, seconds, sims))
    a, b = a.astype(np.int64), b.astype(np.int64)
    # Each pair is found from both ends (exact search; approximate: at least from one): once each.
    order = np.lexsort((b, a))
    # float16 vectors of norm 1 can have an inner product a hair above 1.
    a, b, s = a[order], b[order], np.minimum(s[order], 1.0).astype(np.float32)
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], s[first]


def group(n: int, a: np.ndarray, b: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy grouping of sorted pairs (a < b): per position, the position it duplicates (-1: kept)
    and the similarity to it. In order, a kept position claims every unclaimed later neighbour."""
    duplicate_of = np.full(n, -1, dtype=np.int64)
    similarity = np.zeros(n, dtype=np.float32)
    if not len(a):  # no pair reached the threshold
        return duplicate_of, similarity
    starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        keeper = a[lo]
        if duplicate_of[keeper] >= 0:
            continue  # a duplicate claims nothing: its neighbours are compared with kept rows only
        later, sim = b[lo:hi], sims[lo:hi]
        free = duplicate_of[later] < 0
        duplicate_of[later[free]] = keeper
        similarity[later[free]] = sim[free]
    return duplicate_of, similarity


def near_duplicates(
    row_ids: np.ndarray, vectors: np.ndarray, threshold: float, settings: SearchSettings
) -> tuple[pa.Table, dict[str, Any]]:
    """The near_duplicates table of embeddings sorted by row id, and how the search was made."""
    a, b, sims, how = similar_pairs(vectors, threshold, settings)
    duplicate_of, similarity = group(len(row_ids), a, b, sims)
    dup = np.flatnonzero(duplicate_of >= 0)
    table = pa.table(
        {
            "row_id": pa.array(row_ids[dup], pa.int64()),
            "duplicate_of": pa.array(row_ids[duplicate_of[dup]], pa.int64()),
            "similarity": pa.array(similarity[dup], pa.float32()),
        },
        schema=NEAR_DUPLICATES_SCHEMA,
    )
    return table, {**how, "pairs": len(a)}


def dedupe(store: Store, threshold: float, settings: SearchSettings | None = None) -> dict[str, Any]:
    """Find a job's near-duplicate images and write ``near_duplicates.parquet``; returns a summary."""
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold {threshold}: a cosine similarity above 0 and at most 1")
    settings = settings or SearchSettings.from_config()
    progress = read_progress(store)
    spec = progress.spec
    shards = sorted(progress.committed)
    if not shards:
        raise UserError(f"job {spec['job']} has no committed shard yet: nothing to deduplicate")
    started = time.perf_counter()
    row_ids, vectors = read_embeddings(store, spec, shards=shards)
    read_s = time.perf_counter() - started
    table, how = near_duplicates(row_ids, vectors, threshold, settings)
    summary = {
        "job": spec["job"],
        "rows": len(row_ids),
        "near_duplicates": table.num_rows,
        "kept_with_duplicates": len(set(table.column("duplicate_of").to_pylist())),
        "threshold": threshold,
        **how,
        "dimensions": int(vectors.shape[1]),
        "shards": shards,
        "partial": len(shards) < progress.shards_total,
        "read_s": round(read_s, 3),
        "search_s": round(time.perf_counter() - started - read_s, 3),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    table = table.replace_schema_metadata({DEDUPE_META: json.dumps(summary)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    store.put(NEAR_DUPLICATES_KEY, sink.getvalue().to_pybytes())
    return {**summary, "written": store.url_of(NEAR_DUPLICATES_KEY)}


def read_near_duplicates(store: Store) -> tuple[pa.Table, dict[str, Any]] | None:
    """A job's near_duplicates.parquet and how it was made; None when ``dedupe`` never ran."""
    if not store.exists(NEAR_DUPLICATES_KEY):
        return None
    table = read_table(store, NEAR_DUPLICATES_KEY)
    meta = json.loads((table.schema.metadata or {}).get(DEDUPE_META, b"{}"))
    return table, meta


@click.command("dedupe")
@click.argument("job")
@OUTPUT
@click.option(
    "--threshold",
    type=float,
    help="Cosine similarity of CLIP image embeddings at or above which two images are near "
    "duplicates [0.95].",
)
@JSON
def dedupe_command(job: str, output: str, threshold: float | None, as_json: bool) -> None:
    """Find near-duplicate images across JOB from its embeddings; writes near_duplicates.parquet.

    In each group the smallest row id is kept; `producer finalize` then adds the
    near_duplicate_of column (--drop-near-duplicates leaves those rows out).
    """
    store = job_store(output, job)
    summary = dedupe(store, float(defaults()["dedupe"]["threshold"]) if threshold is None else threshold)
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"{summary['job']}: {summary['near_duplicates']:,} of {summary['rows']:,} images are near duplicates "
        f"(similarity >= {summary['threshold']:g}) of {summary['kept_with_duplicates']:,} kept images; "
        f"{summary['method']} search in {summary['search_s']:.1f} s"
    )
    if summary["partial"]:
        click.echo("partial: only the committed shards were compared; run dedupe again when the job is done")
    click.echo(f"written: {summary['written']}")
