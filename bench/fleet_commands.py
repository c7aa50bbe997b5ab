"""How long `producer status` and `producer finalize` take on a large job.

A job of SHARDS committed parts (ROWS rows each, the job's real metadata schema) is laid
out in a local SeaweedFS, with a stats object per part and HEARTBEATS worker heartbeats,
as workers would leave it; no images (status and finalize read metadata only, unless
--webdataset). Then it times, through the real code:

- `StatusReader.read()` cold (the newest parts' stats fetched, `[status] stats_read`) and
  warm (the `--watch` refresh: listings and heartbeats),
- `finalize()` (stream every part into metadata.parquet, write the card).

    .venv/bin/python bench/fleet_commands.py --shards 2000 --rows 256
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
from harness import BUCKET, local_services

from fewstep.contract import (
    CANDIDATE_COLUMNS,
    CONDITION_COLUMNS,
    FORMAT_VERSION,
    SCORE_COLUMNS,
    heartbeat_key,
    image_key,
    metadata_key,
    metadata_schema,
    stats_key,
)
from fewstep.storage import open_store
from producer.finalize import finalize
from producer.status import StatusReader

FIELDS = {"category": "string", "challenge": "string", "note": "string"}
ATTEMPT = "20261128T000000.000000Z-bench000"


def part_table(shard: int, rows: int) -> bytes:
    schema = metadata_schema(FIELDS)
    lo = (shard - 1) * rows
    now = dt.datetime.now(dt.UTC)
    columns = {
        "image_name": [f"{r:012d}.png" for r in range(lo, lo + rows)],
        "prompt": [f"a photo of thing {r}, in the style of painter {r % 97}" for r in range(lo, lo + rows)],
        "part_id": [shard] * rows, "seed": [r * 2654435761 % 2**32 for r in range(lo, lo + rows)],
        "step": [1] * rows, "cfg": [0.0] * rows, "sampler": ["euler-trailing"] * rows,
        "width": [512] * rows, "height": [512] * rows, "model": ["sdxs-512-0.9"] * rows,
        "model_revision": ["main"] * rows, "row_id": list(range(lo, lo + rows)),
        "image_key": [image_key(shard, ATTEMPT, r, "png") for r in range(lo, lo + rows)],
        "format": ["png"] * rows, "sha256": ["0" * 64] * rows, "bytes": [300_000] * rows,
        "nsfw": [False] * rows, "prompt_tokens": [14] * rows, "truncated": [False] * rows,
        "source": ["partiprompts"] * rows, "source_row": list(range(lo, lo + rows)),
        "gen_ms": [3.0] * rows, "worker": [f"gpu-{shard % 8}:1:cuda:0"] * rows, "attempt": [1] * rows,
        "attempt_id": [ATTEMPT] * rows,
        "created_at": [now] * rows, "category": ["Animals"] * rows, "challenge": ["Basic"] * rows,
        "note": [""] * rows, "format_quality": [None] * rows, "png_level": [6] * rows,
        "encoder": ["pillow-11.0.0"] * rows, "dtype": ["float16"] * rows, "vae": ["default"] * rows,
        "image_offset": [None] * rows, "image_row": [None] * rows,
    }  # fmt: skip
    for name in SCORE_COLUMNS + CONDITION_COLUMNS + CANDIDATE_COLUMNS:  # text-only, no --score, K = 1
        columns[name] = [None] * rows
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), out, compression="zstd")
    return out.getvalue()


def lay_out(job_url: str, shards: int, rows: int, heartbeats: int) -> None:
    store = open_store(job_url)
    spec = {
        "format_version": FORMAT_VERSION, "job": "bench", "job_url": job_url, "queue": "bench.sdxs-512-0.9",
        "source": {"name": "partiprompts", "path": "bench", "fields": FIELDS, "selection": {}},
        "model": {"name": "sdxs-512-0.9", "kind": "preset", "repo": "IDKiro/sdxs-512-0.9",
                  "revision": "main"},
        "generation": {"steps": 1, "guidance": 0.0, "width": 512, "height": 512, "sampler": "euler-trailing",
                       "format": "png", "png_level": 6},
        "seed": 0, "shard_size": rows,
        "counts": {"prompts": shards * rows, "shards": shards, "skipped_empty": 0},
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    store.put("job.json", json.dumps(spec).encode())
    template = part_table(1, rows)  # parts differ only in ids; one real table per part below

    def one(shard: int) -> None:
        store.put(metadata_key(shard), part_table(shard, rows) if shard > 1 else template)
        stats = {"shard": shard, "attempt": 1, "worker": "gpu-0:1:cuda:0", "images": rows, "seconds": 1.0,
                 "generate_s": 0.8, "encode_s": 0.1, "upload_s": 0.1, "gpu_idle_fraction": 0.02,
                 "images_per_s": float(rows), "finished_at": dt.datetime.now(dt.UTC).isoformat()}  # fmt: skip
        store.put(stats_key(shard), json.dumps(stats).encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(1, shards + 1)))
    for i in range(heartbeats):
        beat = {"worker": f"gpu-{i}:1:cuda:0", "state": "working", "shard": shards, "images_per_s": 300.0,
                "last_seen": dt.datetime.now(dt.UTC).isoformat(), "interval_s": 5}  # fmt: skip
        store.put(heartbeat_key(beat["worker"]), json.dumps(beat).encode())


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--heartbeats", type=int, default=64)
    args = parser.parse_args()
    with local_services():
        job_url = f"s3://{BUCKET}/jobs/bench"
        _, seconds = timed(lambda: lay_out(job_url, args.shards, args.rows, args.heartbeats))
        print(f"laid out {args.shards} parts x {args.rows} rows in {seconds:.1f}s")
        reader = StatusReader(open_store(job_url), use_redis=False)
        status, cold = timed(reader.read)
        _, warm = timed(reader.read)
        assert status.progress.state == "done"
        assert len(status.stats) == min(args.shards, reader.stats_read)
        summary, fin = timed(lambda: finalize(open_store(job_url)))
        rows = summary["rows"]
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; SeaweedFS on 127.0.0.1")
        print(f"status cold read ({args.shards} parts, {len(status.stats)} stats objects): {cold:.2f}s")
        print(f"status --watch refresh (listings + {args.heartbeats} heartbeats): {warm:.2f}s")
        print(f"finalize: {rows:,} rows from {args.shards} parts in {fin:.1f}s ({rows / fin:,.0f} rows/s)")


if __name__ == "__main__":
    main()
