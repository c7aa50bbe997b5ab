"""The image embeddings of a job (``--embeddings``), read from its committed shards.

Each attempt of a shard writes ``embeddings/part-N/<attempt-id>.parquet`` (columns ``row_id``
and ``embedding``: the L2-normalised CLIP image embedding, float16, a fixed-size list) before
its commit; the committed metadata's ``attempt_id`` names the one that counts, so a reader
never sees a losing attempt's vectors. ``read_embeddings`` is the one reader (``producer
dedupe`` and ``producer verify`` use it); ``check_shard_embeddings`` is verify's check.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from fewstep import UserError
from fewstep.contract import embeddings_key, embeddings_schema, metadata_key, part_name
from fewstep.scorers import embeddings_wanted
from fewstep.storage import KeyMissing, Store, read_table
from producer.progress import read_progress

#: How far from 1 a stored float16 embedding's norm may be (float16 keeps ~3 decimal digits).
NORM_TOLERANCE = 1e-2


def _matrix(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float16).reshape(-1, dim)


def read_shard_embeddings(store: Store, shard: int, attempt_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, float16 matrix) of one attempt's embeddings object, in the object's row order."""
    table = read_table(store, embeddings_key(shard, attempt_id))
    if not pa.types.is_fixed_size_list(table.schema.field("embedding").type):
        raise UserError(f"{embeddings_key(shard, attempt_id)}: embedding is not a fixed-size list")
    return table.column("row_id").to_numpy().astype(np.int64), _matrix(table)


def _committed_attempt(store: Store, shard: int) -> str:
    ids = set(read_table(store, metadata_key(shard), ["attempt_id"]).column("attempt_id").to_pylist())
    if len(ids) != 1 or None in ids:
        raise UserError(f"{part_name(shard)}: committed metadata names {len(ids)} attempts, not one")
    return ids.pop()


def read_embeddings(
    store: Store, spec: dict[str, Any] | None = None, threads: int = 16, shards: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(row ids int64, float16 matrix rows × dim) of every committed shard of the job, sorted by
    row id; each shard's vectors from the attempt its committed metadata names. A job without
    ``--embeddings``, or a committed shard whose object is missing, is a :class:`UserError`."""
    progress = read_progress(store)
    spec = spec or progress.spec
    if not embeddings_wanted(spec):
        raise UserError(
            f"job {spec['job']} has no image embeddings: enqueue it with --score clip --embeddings"
        )
    shards = sorted(progress.committed) if shards is None else shards

    def one(shard: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            return read_shard_embeddings(store, shard, _committed_attempt(store, shard))
        except KeyMissing:
            raise UserError(f"{part_name(shard)} is committed but its embeddings object is missing") from None

    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(one, shards))
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float16)
    if len({m.shape[1] for _, m in parts}) > 1:
        raise UserError(f"job {spec['job']}: shards hold embeddings of different dimensions")
    row_ids = np.concatenate([r for r, _ in parts])
    matrix = np.concatenate([m for _, m in parts])
    if np.all(row_ids[1:] > row_ids[:-1]):
        return row_ids, matrix  # shards hold consecutive rows: no second copy of the vectors
    order = np.argsort(row_ids, kind="stable")
    return row_ids[order], matrix[order]


def check_shard_embeddings(store: Store, shard: int, attempt_id: str, row_ids: set[int]) -> list[str]:
    """Problems of a committed shard's embeddings object: missing, another schema, rows other
    than the metadata's (each once), or vectors that are not unit length."""
    key = embeddings_key(shard, attempt_id)
    try:
        table = read_table(store, key)
    except KeyMissing:
        return [f"{key}: missing (the job has --embeddings)"]
    field = table.schema.field("embedding") if "embedding" in table.schema.names else None
    if field is None or not pa.types.is_fixed_size_list(field.type):
        return [f"{key}: no fixed-size list column 'embedding'"]
    problems = []
    if not table.schema.equals(embeddings_schema(field.type.list_size)):
        problems.append(f"{key}: schema differs from the embeddings schema")
    ids = table.column("row_id").to_pylist()
    if len(ids) != len(set(ids)) or set(ids) != row_ids:
        problems.append(f"{key}: holds rows other than the committed metadata's (or some twice)")
    norms = np.linalg.norm(_matrix(table).astype(np.float32), axis=1)
    bad = int(np.sum(~(np.abs(norms - 1) <= NORM_TOLERANCE)))
    if bad:
        problems.append(f"{key}: {bad} embeddings are not L2-normalised")
    return problems
