"""``producer verify JOB``: check every committed shard against storage and its manifest.

For each committed shard: the metadata has the job's schema and exactly the manifest's
rows (row ids, prompts byte for byte, seeds, source rows), keys built from ids in the folder
of the one attempt that committed, and every image exists with the size and sha256 the
metadata records (each image is read back and hashed). Across shards, no row appears
twice. Uncommitted shards are counted, not checked: readers trust committed shards only.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import click

from fewstep.contract import (
    IMAGE_EXTENSIONS,
    attempt_images_prefix,
    image_key,
    manifest_key,
    metadata_key,
    metadata_schema,
    part_name,
)
from fewstep.storage import KeyMissing, Store, read_table
from producer.options import JSON, OUTPUT, job_store
from producer.progress import read_progress

# Problems listed in full; beyond this only counted.
SHOWN = 50


@dataclass
class Report:
    """What verification found."""

    images: int = 0
    bytes: int = 0
    mismatches: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.mismatches += 1
        if len(self.problems) < SHOWN:
            self.problems.append(text)


def _check_image(store: Store, key: str, sha256: str, size: int) -> str | None:
    try:
        data = store.get(key)
    except KeyMissing:
        return f"{key}: missing"
    if len(data) != size:
        return f"{key}: {len(data)} bytes, metadata says {size}"
    if hashlib.sha256(data).hexdigest() != sha256:
        return f"{key}: sha256 differs from the metadata"
    return None


def verify_shard(
    store: Store, spec: dict[str, Any], shard: int, pool: ThreadPoolExecutor, report: Report
) -> set[int]:
    """Check one committed shard; returns its row ids."""
    part = part_name(shard)
    meta = read_table(store, metadata_key(shard))
    try:
        manifest = read_table(store, manifest_key(shard))
    except KeyMissing:
        report.problem(f"{part}: committed but its manifest is missing")
        return set(meta.column("row_id").to_pylist())
    if not meta.schema.equals(metadata_schema(spec["source"].get("fields", {}))):
        report.problem(f"{part}: metadata schema differs from the job's schema")
    meta = meta.sort_by("row_id")
    manifest = manifest.sort_by("row_id")
    if meta.num_rows != manifest.num_rows:
        report.problem(f"{part}: {meta.num_rows} metadata rows for {manifest.num_rows} manifest rows")
    for column in ("row_id", "prompt", "seed", "source_row"):
        if meta.column(column).to_pylist() != manifest.column(column).to_pylist():
            report.problem(f"{part}: column {column} differs from the manifest")
    rows = meta.to_pylist()
    ext = IMAGE_EXTENSIONS[spec["generation"]["format"]]
    attempt_ids = {row["attempt_id"] for row in rows}
    if len(attempt_ids) != 1 or None in attempt_ids:
        report.problem(f"{part}: rows name {len(attempt_ids)} attempts; a commit holds exactly one")
        return {row["row_id"] for row in rows}
    attempt_id = attempt_ids.pop()
    for row in rows:
        if row["part_id"] != shard or row["image_key"] != image_key(shard, attempt_id, row["row_id"], ext):
            report.problem(f"{part}: row {row['row_id']} has part {row['part_id']}, key {row['image_key']!r}")
    # The committed attempt's folder only: what losing attempts left is not this shard's.
    stored = dict(store.list(attempt_images_prefix(shard, attempt_id)))
    checks = []
    for row in rows:
        key, size = row["image_key"], row["bytes"]
        if key not in stored:
            report.problem(f"{key}: missing")
        elif stored[key] != size:
            report.problem(f"{key}: {stored[key]} bytes, metadata says {size}")
        else:
            checks.append((size, pool.submit(_check_image, store, key, row["sha256"], size)))
    for size, check in checks:
        problem = check.result()
        if problem:
            report.problem(problem)
        else:
            report.images += 1
            report.bytes += size
    return {row["row_id"] for row in rows}


def verify(store: Store, threads: int = 16) -> dict[str, Any]:
    """Verify every committed shard of the job; a summary with ``ok`` and the problems found."""
    progress = read_progress(store)
    spec = progress.spec
    report = Report()
    seen: set[int] = set()
    with ThreadPoolExecutor(threads) as pool:
        for shard in sorted(progress.committed):
            rows = verify_shard(store, spec, shard, pool, report)
            for row_id in sorted(rows & seen):
                report.problem(f"{part_name(shard)}: row {row_id} is committed in another shard too")
            seen |= rows
    return {
        "job": spec["job"],
        "ok": report.mismatches == 0,
        "shards_total": progress.shards_total,
        "shards_committed": len(progress.committed),
        "shards_failed": len(progress.failed),
        "shards_open": len(progress.open_shards),
        "rows_committed": len(seen),
        "images_checked": report.images,
        "bytes_checked": report.bytes,
        "mismatches": report.mismatches,
        "problems": report.problems,
    }


@click.command("verify")
@click.argument("job")
@OUTPUT
@JSON
def verify_command(job: str, output: str, as_json: bool) -> int:
    """Check every committed shard of JOB: images exist, sizes and sha256 match, rows equal the manifest."""
    summary = verify(job_store(output, job))
    if as_json:
        click.echo(json.dumps(summary))
    else:
        for problem in summary["problems"]:
            click.echo(f"MISMATCH {problem}")
        more = summary["mismatches"] - len(summary["problems"])
        if more > 0:
            click.echo(f"... and {more} more")
        click.echo(
            f"{summary['job']}: {'OK' if summary['ok'] else 'FAILED'}: {summary['shards_committed']}/"
            f"{summary['shards_total']} shards committed and checked, {summary['images_checked']} images "
            f"({summary['bytes_checked']} bytes) verified, {summary['mismatches']} mismatches; "
            f"{summary['shards_open']} open, {summary['shards_failed']} failed"
        )
    return 0 if summary["ok"] else 1
