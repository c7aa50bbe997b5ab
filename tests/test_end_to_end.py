"""The whole path on real services: producer → Redis/Celery → worker process → S3."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from fewstep.storage import open_store
from producer.sources.partiprompts import parse
from tests.conftest import REPO
from tests.support import cli_json, committed_metadata, layout_or_files, start_worker, wait_done

SAMPLE = REPO / "examples" / "parti-sample.tsv"


def enqueue(path: Path, job: str, output: str, env, *extra: str) -> dict:
    """``producer enqueue partiprompts`` with the tiny model, files layout unless ``extra`` names one."""
    return cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(path), "--model", "tiny",
        "--job", job, "--output", output, *layout_or_files(extra), env=env,
    )  # fmt: skip


def check_job(job_url: str, source: dict[str, list], rows: int) -> list[bytes]:
    """Every prompt exactly once, byte-identical, with a decodable image of the declared size
    whose sha256 and size match the metadata. Returns the image bytes in row order."""
    table = committed_metadata(job_url)
    assert table.num_rows == rows
    assert table.column("row_id").to_pylist() == list(range(rows))
    assert table.column("source_row").to_pylist() == source["source_row"][:rows]
    assert table.column("prompt").to_pylist() == source["prompt"][:rows]  # byte-exact
    assert table.column("category").to_pylist() == source["category"][:rows]
    store = open_store(job_url)
    images = []
    for row in table.to_pylist():
        data = store.get(row["image_key"])
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["bytes"]
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.format == "PNG" and image.size == (row["width"], row["height"]) == (128, 128)
        assert row["image_name"] == f"{row['row_id']:012d}.png"
        assert row["image_key"] == f"images/part-{row['part_id']:06d}/{row['attempt_id']}/{row['image_name']}"
        assert (row["step"], row["cfg"], row["sampler"], row["model"]) == (1, 0.0, "euler-trailing", "tiny")
        images.append(data)
    return images


def run_twice(path: Path, output: str, env, tmp_path: Path, rows: int, shard_size: int) -> None:
    source = parse(path.read_bytes(), str(path))
    first = enqueue(path, "first", output, env, "--shard-size", str(shard_size), "--limit", str(rows))
    second = enqueue(path, "second", output, env, "--shard-size", str(shard_size), "--limit", str(rows))
    assert first["shards"] == second["shards"] == -(-rows // shard_size)
    worker = start_worker(env, "--exit-when-idle", "2", "--batch-size", "8", log_path=tmp_path / "worker.log")
    try:
        for job in ("first", "second"):
            status = wait_done(job, output, env)
            assert status["shards_done"] == status["shards_total"] == first["shards"]
            assert status["images_done"] == rows and status["shards_failed"] == 0
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()
    images_first = check_job(first["job_url"], source, rows)
    images_second = check_job(second["job_url"], source, rows)
    # Same spec under a new name: same seeds, so the very same image bytes.
    assert images_first == images_second
    # Every shard has the one schema.
    store = open_store(first["job_url"])
    schemas = {pq.read_schema(io.BytesIO(store.get(k))) for k, _ in store.list("metadata/")}
    assert len(schemas) == 1


def test_real_partiprompts_job_runs_end_to_end_and_reproduces(env, output, parti_path, tmp_path):
    run_twice(parti_path, output, env, tmp_path, rows=48, shard_size=24)


def test_sample_job_runs_end_to_end_with_quotes_and_spaces_byte_exact(env, output, tmp_path):
    run_twice(SAMPLE, output, env, tmp_path, rows=32, shard_size=16)
