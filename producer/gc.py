"""``producer gc JOB``: remove what attempts that can never be committed left behind.

Every attempt writes its images under its own folder, ``images/part-N/<attempt-id>/`` (or one
``images/part-N/<attempt-id>.tar``/``.parquet``), and, with ``--embeddings``, its own
``embeddings/part-N/<attempt-id>.parquet``; the committed metadata names exactly one attempt.
gc deletes an attempt's objects only on proof that no commit names them or ever can
(:class:`fewstep.attempts.ShardEvidence`):

- the shard is committed and its marker names another attempt (the marker was written only
  if absent: no second attempt can ever commit); or
- the attempt's own record says it ended, and that it ended without sending the marker's PUT.

Nothing is judged from a clock or a heartbeat: an attempt whose record says ``running``, or
that ended after sending its commit (the answer lost), is kept until a marker settles it.
The evidence of a shard is read again right before its objects are deleted, and only what
still qualifies is deleted, in ``DeleteObjects`` batches. Shards are listed one at a time,
so memory does not grow with the job. ``--abandoned-after`` can only delay: an ended
attempt's objects stay until its record has been ended that long (stragglers of its upload
pool land meanwhile). Dry run by default: it prints what it would delete.
"""

from __future__ import annotations

import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import click

from fewstep.attempts import ShardEvidence
from fewstep.contract import (
    EMBEDDINGS,
    IMAGES,
    embeddings_key_attempt,
    image_key_attempt,
    parse_time,
    part_name,
)
from fewstep.storage import Store
from producer.options import JSON, OUTPUT, abandoned_after, job_store
from producer.progress import read_spec

THREADS = 16


@dataclass
class ShardGarbage:
    """One shard's verdict: attempt folders removed (or to remove), and what was kept."""

    shard: int
    folders: dict[str, tuple[int, int]] = field(default_factory=dict)  # attempt: (objects, bytes)
    kept_committed: int = 0  # objects of the committed attempt
    kept_open: int = 0  # objects of attempts that may still commit, or ended too recently


def _folders(store: Store, shard: int) -> dict[str, list[tuple[str, int]]]:
    """Objects of each attempt of the shard: ``{attempt: [(key, size), ...]}``."""
    found: dict[str, list[tuple[str, int]]] = {}
    for prefix, owner_of in ((IMAGES, image_key_attempt), (EMBEDDINGS, embeddings_key_attempt)):
        for key, size in store.list(f"{prefix}/{part_name(shard)}/"):
            owner = owner_of(key)
            if owner is not None and owner[0] == shard:
                found.setdefault(owner[1], []).append((key, size))
    return found


def _ended_long_enough(evidence: ShardEvidence, attempt: str, min_age: float) -> bool:
    if evidence.committed is not None:
        return True  # a committed shard's losers: the marker is the whole proof
    ended = parse_time(evidence.records.get(attempt, {}).get("ended_at"))
    return ended is not None and (dt.datetime.now(dt.UTC) - ended).total_seconds() >= min_age


def _garbage(evidence: ShardEvidence, attempts: set[str], min_age: float) -> set[str]:
    return {
        a for a in attempts if evidence.can_never_be_named(a) and _ended_long_enough(evidence, a, min_age)
    }


def collect_shard(store: Store, shard: int, min_age: float, delete: bool) -> ShardGarbage:
    """Find (and with ``delete``, remove) one shard's garbage, on evidence read just before."""
    verdict = ShardGarbage(shard)
    folders = _folders(store, shard)
    if not folders:
        return verdict
    evidence = ShardEvidence.read(store, shard)
    garbage = _garbage(evidence, set(folders), min_age)
    if delete and garbage:
        evidence = ShardEvidence.read(store, shard)  # re-read right before acting
        garbage = _garbage(evidence, garbage, min_age)
        if garbage:
            store.delete_many([key for a in sorted(garbage) for key, _size in folders[a]])
    for attempt, keys in folders.items():
        if attempt in garbage:
            verdict.folders[attempt] = (len(keys), sum(size for _key, size in keys))
        elif attempt == evidence.committed:
            verdict.kept_committed += len(keys)
        else:
            verdict.kept_open += len(keys)
    return verdict


def collect(store: Store, min_age: float, delete: bool, threads: int = THREADS) -> dict[str, Any]:
    """Find (and with ``delete``, remove) the job's garbage, shard by shard; a summary."""
    spec = read_spec(store)
    shards = range(1, int(spec["counts"]["shards"]) + 1)
    with ThreadPoolExecutor(threads, thread_name_prefix="gc") as pool:
        verdicts = list(pool.map(lambda s: collect_shard(store, s, min_age, delete), shards))
    folders = [
        {"shard": v.shard, "part": part_name(v.shard), "attempt": attempt, "objects": n, "bytes": size}
        for v in verdicts
        for attempt, (n, size) in sorted(v.folders.items())
    ]
    return {
        "job_url": store.url,
        "deleted": delete,
        "folders": folders,
        "objects": sum(f["objects"] for f in folders),
        "bytes": sum(f["bytes"] for f in folders),
        "kept_committed_objects": sum(v.kept_committed for v in verdicts),
        "kept_open_objects": sum(v.kept_open for v in verdicts),
    }


@click.command("gc")
@click.argument("job")
@OUTPUT
@click.option("--delete", is_flag=True, help="Delete what was found (default: only list it).")
@abandoned_after(
    "Delay only: an ended attempt's objects stay until its record has been ended this long "
    "(a committed shard's losers go at once). Nothing is deleted on age alone."
)
@JSON
def gc_command(job: str, output: str, delete: bool, abandoned_after: float, as_json: bool) -> None:
    """List (or --delete) the objects of JOB's attempts that can never be committed: a committed
    shard's losers, and attempts whose record says they ended before committing."""
    summary = collect(job_store(output, job), abandoned_after, delete)
    if as_json:
        click.echo(json.dumps(summary))
        return
    for folder in summary["folders"]:
        verb = "deleted" if delete else "would delete"
        click.echo(
            f"{verb} {folder['part']} attempt {folder['attempt']}: {folder['objects']} objects, "
            f"{folder['bytes']} bytes"
        )
    click.echo(
        f"{job}: {summary['objects']} objects ({summary['bytes']} bytes) in {len(summary['folders'])} "
        f"attempt folders {'deleted' if delete else 'to delete (dry run; --delete to remove them)'}; "
        f"kept {summary['kept_committed_objects']} committed, {summary['kept_open_objects']} of attempts "
        "that may still commit or ended too recently"
    )
