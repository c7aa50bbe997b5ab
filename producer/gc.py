"""``producer gc JOB``: remove the images that attempts which can no longer commit left behind.

Every attempt writes its images under its own folder, ``images/part-N/<attempt-id>/`` (and,
with ``--embeddings``, its own ``embeddings/part-N/<attempt-id>.parquet``), and the
committed metadata names exactly one of them. What other attempts wrote is never part
of the dataset (no reader lists it) but costs storage. A folder is garbage when:

- its shard is committed and the metadata names another attempt; or
- its shard is open or failed and the folder's attempt record has ended (``error``,
  ``superseded``, ``interrupted``, ``storage_unavailable``): that delivery is over, a later
  one writes its own folder; or its record still says ``running`` though it started more
  than ``--abandoned-after`` seconds ago and no live worker heartbeat names it.

Nothing else under ``images/`` is touched: the committed attempt's folder, folders of
attempts that may still commit, and keys outside attempt folders (``part-N.json`` of
``finalize --json-parts``, images of jobs written before attempt folders). Dry run by
default: it prints what it would delete.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import click

from fewstep.attempts import history, running_elsewhere
from fewstep.contract import (
    ATTEMPT_ERROR,
    ATTEMPT_INTERRUPTED,
    ATTEMPT_RUNNING,
    ATTEMPT_STORAGE_UNAVAILABLE,
    ATTEMPT_SUPERSEDED,
    EMBEDDINGS,
    IMAGES,
    embeddings_key_attempt,
    image_key_attempt,
    metadata_key,
    parse_time,
    part_name,
)
from fewstep.storage import Store, read_table
from producer.options import JSON, OUTPUT, abandoned_after, job_store
from producer.progress import read_progress

# Attempts that ended without committing: their folder will never be referenced.
ENDED = frozenset({ATTEMPT_ERROR, ATTEMPT_SUPERSEDED, ATTEMPT_INTERRUPTED, ATTEMPT_STORAGE_UNAVAILABLE})


@dataclass
class Garbage:
    """Attempt folders found to be garbage, and what was kept and why."""

    folders: dict[tuple[int, str], list[tuple[str, int]]] = field(default_factory=dict)
    kept_committed: int = 0  # objects of committed attempts
    kept_open: int = 0  # objects of attempts that may still commit

    @property
    def objects(self) -> int:
        return sum(len(keys) for keys in self.folders.values())

    @property
    def bytes(self) -> int:
        return sum(size for keys in self.folders.values() for _key, size in keys)


def committed_attempt(store: Store, shard: int) -> str | None:
    """The attempt id the committed metadata of ``shard`` names (one per commit)."""
    ids = set(read_table(store, metadata_key(shard), ["attempt_id"]).column("attempt_id").to_pylist())
    return ids.pop() if len(ids) == 1 else None


def _dead_attempts(store: Store, shard: int, abandoned_after: float) -> set[str]:
    records = history(store, shard)
    live = running_elsewhere(store, records)
    now = dt.datetime.now(dt.UTC)
    dead = set()
    for record in records:
        state, started = record.get("state"), parse_time(record.get("started_at"))
        if state in ENDED or (
            state == ATTEMPT_RUNNING
            and record.get("id") not in live
            and started is not None
            and (now - started).total_seconds() > abandoned_after
        ):
            dead.add(str(record.get("id")))
    return dead


def find_garbage(store: Store, abandoned_after: float, threads: int = 16) -> Garbage:
    """Every attempt folder of the job that no commit references or can come to reference."""
    progress = read_progress(store)
    folders: dict[tuple[int, str], list[tuple[str, int]]] = defaultdict(list)
    for prefix, owner_of in ((IMAGES, image_key_attempt), (EMBEDDINGS, embeddings_key_attempt)):
        for key, size in store.list(f"{prefix}/"):
            owner = owner_of(key)
            if owner is not None:
                folders[owner].append((key, size))
    shards = sorted({shard for shard, _attempt in folders})

    def keep_for(shard: int) -> tuple[set[str] | None, set[str]]:
        # (the attempt a commit names, or None when open; attempts that can never commit)
        if shard in progress.committed:
            return {committed_attempt(store, shard) or ""}, set()
        return None, _dead_attempts(store, shard, abandoned_after)

    with ThreadPoolExecutor(threads) as pool:
        verdicts = dict(zip(shards, pool.map(keep_for, shards), strict=True))
    garbage = Garbage()
    for (shard, attempt), keys in sorted(folders.items()):
        committed, dead = verdicts[shard]
        if committed is not None and attempt in committed:
            garbage.kept_committed += len(keys)
        elif committed is not None or attempt in dead:
            garbage.folders[(shard, attempt)] = keys
        else:
            garbage.kept_open += len(keys)
    return garbage


def collect(store: Store, abandoned_after: float, delete: bool) -> dict[str, Any]:
    """Find (and with ``delete``, remove) the job's garbage; a summary."""
    garbage = find_garbage(store, abandoned_after)
    if delete:
        keys = [key for keys in garbage.folders.values() for key, _size in keys]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(store.delete, keys))
    return {
        "job_url": store.url,
        "deleted": delete,
        "folders": [
            {
                "shard": shard,
                "part": part_name(shard),
                "attempt": attempt,
                "objects": len(keys),
                "bytes": sum(size for _key, size in keys),
            }
            for (shard, attempt), keys in garbage.folders.items()
        ],
        "objects": garbage.objects,
        "bytes": garbage.bytes,
        "kept_committed_objects": garbage.kept_committed,
        "kept_open_objects": garbage.kept_open,
    }


@click.command("gc")
@click.argument("job")
@OUTPUT
@click.option("--delete", is_flag=True, help="Delete what was found (default: only list it).")
@abandoned_after(
    "An open shard's attempt still 'running' this long after it started, with no live worker "
    "heartbeat naming it, is abandoned."
)
@JSON
def gc_command(job: str, output: str, delete: bool, abandoned_after: float, as_json: bool) -> None:
    """List (or --delete) the images (and embeddings) of JOB's attempts that lost or ended: never
    committed objects."""
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
        "that may still commit"
    )
