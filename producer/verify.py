"""``producer verify JOB``: check every committed shard against storage and its manifest.

For each committed shard: the metadata has the job's schema and exactly the manifest's
rows (row ids, prompts byte for byte, seeds, source rows), keys built from ids in the folder
of the one attempt that committed, and every image exists with the size and sha256 the
metadata records (each image is read back and hashed). With ``--save-control`` every row's
control map is checked too: at the key (and offset or row) the metadata records, of the
size it records, a PNG of the job's width x height (the metadata keeps no digest of it).
For the webdataset and parquet layouts the attempt's one tar or parquet is read whole: each
image member (at the offset the metadata records) or ``image`` row is hashed, and each row's
``.txt``/``.json`` member or parquet row must carry the prompt byte for byte. A job with
``--embeddings`` must have the committed attempt's embeddings object, holding each of its
rows once, unit length. Across shards,
no row appears twice. Uncommitted shards are counted, not checked: readers trust committed shards only.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import click
import pyarrow.parquet as pq
from PIL import Image

from fewstep.contract import (
    CONTROL_IMAGE_COLUMN,
    IMAGE_EXTENSIONS,
    LAYOUT_FILES,
    LAYOUT_WEBDATASET,
    attempt_images_prefix,
    candidate_rows,
    control_name,
    expected_seeds,
    image_key,
    images_parquet_schema,
    images_per_prompt,
    job_layout,
    job_metadata_schema,
    job_saves_control,
    manifest_key,
    metadata_key,
    part_name,
    shard_object_key,
)
from fewstep.scorers import embeddings_wanted
from fewstep.storage import KeyMissing, Store, read_table
from producer.embeddings import check_shard_embeddings
from producer.images import tar_members
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


def _check_control(report: Report, where: str, data: bytes | None, row: dict[str, Any], size: tuple) -> None:
    """A saved control map: present, of the recorded size, a PNG of the job's size."""
    if data is None:
        report.problem(f"{where}: control map missing")
    elif len(data) != row["control_bytes"]:
        report.problem(f"{where}: control map of {len(data)} bytes, metadata says {row['control_bytes']}")
    else:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                found = (image.format, image.size)
        except Exception as e:  # Pillow raises many kinds on damaged files
            report.problem(f"{where}: control map unreadable ({type(e).__name__})")
            return
        if found != ("PNG", size):
            report.problem(f"{where}: control map is {found[0]} {found[1]}, expected PNG {size}")


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
    if not meta.schema.equals(job_metadata_schema(spec)):
        report.problem(f"{part}: metadata schema differs from the job's schema")
    meta = meta.sort_by("row_id")
    expected = manifest.sort_by("row_id").select(["row_id", "prompt", "seed", "source_row"]).to_pydict()
    if images_per_prompt(spec) > 1:  # --keep all: K rows a manifest row
        expected = candidate_rows(expected, images_per_prompt(spec))
    if meta.num_rows != len(expected["row_id"]):
        report.problem(f"{part}: {meta.num_rows} metadata rows for {manifest.num_rows} manifest rows")
    elif "candidate" in meta.schema.names:  # best-of-K: the kept candidate's seed
        expected["seed"] = expected_seeds(spec, expected["seed"], meta.column("candidate").to_pylist())
    for column in ("row_id", "prompt", "seed", "source_row"):
        if meta.column(column).to_pylist() != expected[column]:
            report.problem(f"{part}: column {column} differs from the manifest")
    rows = meta.to_pylist()
    ext = IMAGE_EXTENSIONS[spec["generation"]["format"]]
    attempt_ids = {row["attempt_id"] for row in rows}
    if len(attempt_ids) != 1 or None in attempt_ids:
        report.problem(f"{part}: rows name {len(attempt_ids)} attempts; a commit holds exactly one")
        return {row["row_id"] for row in rows}
    attempt_id = attempt_ids.pop()
    if embeddings_wanted(spec):
        for problem in check_shard_embeddings(store, shard, attempt_id, {row["row_id"] for row in rows}):
            report.problem(problem)
    layout = job_layout(spec)
    if layout != LAYOUT_FILES:
        for row in rows:
            if row["part_id"] != shard:
                report.problem(f"{part}: row {row['row_id']} has part {row['part_id']}")
        _check_shard_object(store, spec, shard_object_key(shard, attempt_id, layout), rows, layout, report)
        return {row["row_id"] for row in rows}
    for row in rows:
        if row["part_id"] != shard or row["image_key"] != image_key(shard, attempt_id, row["row_id"], ext):
            report.problem(f"{part}: row {row['row_id']} has part {row['part_id']}, key {row['image_key']!r}")
    # The committed attempt's folder only: what losing attempts left is not this shard's.
    stored = dict(store.list(attempt_images_prefix(shard, attempt_id)))
    if job_saves_control(spec):
        _check_control_files(store, spec, shard, attempt_id, rows, stored, pool, report)
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


def _job_size(spec: dict[str, Any]) -> tuple[int, int]:
    return int(spec["generation"]["width"]), int(spec["generation"]["height"])


def _check_control_files(
    store: Store,
    spec: dict[str, Any],
    shard: int,
    attempt_id: str,
    rows: list[dict[str, Any]],
    stored: dict[str, int],
    pool: ThreadPoolExecutor,
    report: Report,
) -> None:
    """Files layout: each row's control map in the committed attempt's folder."""
    size = _job_size(spec)
    checks = []
    for row in rows:
        key = attempt_images_prefix(shard, attempt_id) + control_name(row["row_id"])
        if row["control_key"] != key:
            report.problem(f"row {row['row_id']}: control key {row['control_key']!r}, expected {key}")
        elif key not in stored:
            report.problem(f"{key}: control map missing")
        else:
            checks.append((key, row, pool.submit(store.get, key)))
    for key, row, data in checks:
        _check_control(report, key, data.result(), row, size)


def _check_bytes(report: Report, where: str, data: bytes | None, row: dict[str, Any]) -> None:
    if data is None:
        report.problem(f"{where}: missing")
    elif len(data) != row["bytes"]:
        report.problem(f"{where}: {len(data)} bytes, metadata says {row['bytes']}")
    elif hashlib.sha256(data).hexdigest() != row["sha256"]:
        report.problem(f"{where}: sha256 differs from the metadata")
    else:
        report.images += 1
        report.bytes += len(data)


def _check_shard_object(
    store: Store, spec: dict[str, Any], key: str, rows: list[dict[str, Any]], layout: str, report: Report
) -> None:
    """Check the one tar or parquet holding a committed shard's images, member by member."""
    for row in rows:
        if row["image_key"] != key:
            report.problem(f"row {row['row_id']}: image key {row['image_key']!r}, not the commit's {key}")
    try:
        data = store.get(key)
    except KeyMissing:
        report.problem(f"{key}: missing")
        return
    if layout == LAYOUT_WEBDATASET:
        try:
            members = tar_members(data)
        except tarfile.TarError as e:
            report.problem(f"{key}: not a readable tar ({e})")
            return
        for row in rows:
            stem = f"{row['row_id']:012d}"
            offset, image = members.get(row["image_name"], (None, None))
            if image is not None and offset != row["image_offset"]:
                report.problem(f"{key}: member {row['image_name']} at offset {offset}, metadata says "
                               f"{row['image_offset']}")  # fmt: skip
            _check_bytes(report, f"{key}: member {row['image_name']}", image, row)
            if job_saves_control(spec):
                where = f"{key}: member {control_name(row['row_id'])}"
                offset, control = members.get(control_name(row["row_id"]), (None, None))
                if control is not None and offset != row["control_offset"]:
                    report.problem(f"{where} at offset {offset}, metadata says {row['control_offset']}")
                _check_control(report, where, control, row, _job_size(spec))
            text = members.get(f"{stem}.txt", (0, None))[1]
            if text != row["prompt"].encode():
                report.problem(f"{key}: member {stem}.txt differs from the prompt")
            try:
                described = json.loads(members.get(f"{stem}.json", (0, b""))[1])
            except ValueError:
                described = {}
            if described.get("prompt") != row["prompt"] or described.get("row_id") != row["row_id"]:
                report.problem(f"{key}: member {stem}.json differs from the metadata row")
        return
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow raises several kinds on damaged files
        report.problem(f"{key}: not a readable parquet ({e})")
        return
    control = job_saves_control(spec)
    expected = images_parquet_schema(job_metadata_schema(spec), control)
    # The schema's own metadata (HF datasets' features) must match; list columns read back with
    # parquet's item name ("element"), which only the fields' metadata check would refuse.
    if not table.schema.equals(expected) or table.schema.metadata != expected.metadata:
        report.problem(f"{key}: schema differs from the job's images schema")
        return
    stored = table.select(
        ["image", "row_id", "prompt", *([CONTROL_IMAGE_COLUMN] if control else [])]
    ).to_pylist()
    for row in rows:
        index = row["image_row"]
        if index is None or not 0 <= index < len(stored):
            report.problem(f"{key}: row {row['row_id']} has no image row ({index})")
            continue
        found = stored[index]
        if (found["row_id"], found["prompt"]) != (row["row_id"], row["prompt"]):
            report.problem(f"{key}: row {index} holds row {found['row_id']} or another prompt")
        image = (found["image"] or {}).get("bytes")
        _check_bytes(report, f"{key}: row {index} ({row['image_name']})", image, row)
        if control:
            where = f"{key}: row {index} ({CONTROL_IMAGE_COLUMN})"
            if row["control_offset"] != index:
                report.problem(f"{where}: metadata says row {row['control_offset']}")
            _check_control(
                report, where, (found[CONTROL_IMAGE_COLUMN] or {}).get("bytes"), row, _job_size(spec)
            )


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
