"""Enqueue at DiffusionDB scale: wall time, peak RSS and Redis memory of a real enqueue.

Writes a DiffusionDB-shaped ``metadata.parquet`` (the 13 columns and types of the real
table, prompt lengths drawn around DiffusionDB's, a quarter of the rows repeating
another row's prompt as in 2M's 1.5M unique prompts), starts a local Redis +
SeaweedFS (``fewstep.services``), and times::

    producer enqueue diffusiondb --path FILE --shard-size 1000 --model tiny --job ... --output s3://...

as a child process: wall time, its peak RSS (``wait4``), and the growth of Redis's
``used_memory`` over the enqueue. Run it with several ``--rows`` for the slope.

    .venv/bin/python bench/enqueue_diffusiondb.py --rows 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from fewstep import services
from producer.sources.diffusiondb import METADATA_SCHEMA


def _words(rng: np.random.Generator, count: int) -> list[str]:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = np.linspace(2.0, 0.2, len(letters))
    weights /= weights.sum()
    lengths = rng.integers(2, 11, size=count)
    chars = rng.choice(letters, size=int(lengths.sum()), p=weights)
    cuts = np.cumsum(lengths)[:-1]
    return ["".join(w) for w in np.split(chars, cuts)]


def _prompts(rng: np.random.Generator, count: int) -> list[str]:
    """Prompts whose lengths follow a log-normal around 130 characters (mean ~155, up to 1,500)."""
    vocab = _words(rng, 30_000)
    target = np.clip(rng.lognormal(np.log(130), 0.6, size=count), 3, 1500).astype(int)
    words = rng.integers(0, len(vocab), size=int(target.sum() // 4 + count))
    out, at = [], 0
    for length in target:
        parts, size = [], 0
        while size < length:
            word = vocab[words[at % len(words)]]
            at += 1
            parts.append(word)
            size += len(word) + 1
        out.append(", ".join(parts) if length % 3 == 0 else " ".join(parts))
    return out


def write_metadata(path: Path, rows: int, row_group_rows: int, seed: int = 0) -> None:
    """A DiffusionDB-shaped metadata table with ``rows`` rows in row groups of ``row_group_rows``.

    Unique prompts: three quarters of the rows, at most 1.8M (2M has 1.5M unique prompts,
    Large 1.8M); the other rows repeat one of them.
    """
    rng = np.random.default_rng(seed)
    unique = _prompts(rng, max(1, min(rows * 3 // 4, 1_800_000)))
    which = np.concatenate([np.arange(len(unique)), rng.integers(0, len(unique), size=rows - len(unique))])
    rng.shuffle(which)
    writer = pq.ParquetWriter(path, METADATA_SCHEMA)
    start = np.datetime64("2022-08-06T00:00:00", "us").astype(np.int64)
    for lo in range(0, rows, row_group_rows):
        n = min(row_group_rows, rows - lo)
        idx = np.arange(lo, lo + n)
        stamps = start + rng.integers(0, 14 * 86_400_000_000, size=n)
        columns = {
            "image_name": [f"{uuid.UUID(int=int(x), version=4)}.png" for x in rng.integers(0, 2**62, size=n)],
            "prompt": [unique[i] for i in which[lo : lo + n]],
            "part_id": (idx // 1000 + 1).astype(np.uint16),
            "seed": rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32),
            "step": rng.choice(np.array([20, 30, 50, 50, 50, 100, 150], np.uint16), size=n),
            "cfg": rng.choice(np.array([7.0, 7.5, 7.5, 10.0, 12.0, 15.0], np.float32), size=n),
            "sampler": rng.choice(np.arange(1, 10, dtype=np.uint8), size=n),
            "width": rng.choice(np.array([512, 512, 512, 768, 640, 448], np.uint16), size=n),
            "height": rng.choice(np.array([512, 512, 512, 768, 640, 448], np.uint16), size=n),
            "user_name": [None if x < 0.01 else f"{int(x * 2**60):064x}" for x in rng.random(size=n)],
            "timestamp": pa.array(stamps, mask=rng.random(n) < 0.01).cast(pa.timestamp("us", tz="UTC")),
            "image_nsfw": np.where(rng.random(n) < 0.02, 2.0, rng.random(n)).astype(np.float32),
            "prompt_nsfw": rng.random(n).astype(np.float32),
        }
        writer.write_table(pa.table(columns, schema=METADATA_SCHEMA), row_group_size=n)
    writer.close()


def _machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        memory = [
            line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
        ]
    except OSError:
        memory = []
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "memory": memory[0].split(":", 1)[1].strip() if memory else "",
        "load_average_before": os.getloadavg(),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
    }


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_enqueue(path: Path, svc: services.Services, job: str, shard_size: int, extra: list[str]) -> dict:
    """Time one enqueue in a child process; returns wall time, peak RSS, CPU and Redis growth."""
    env = {**os.environ, **svc.env(), "FEWSTEP_QUEUE_PREFIX": "bench" + uuid.uuid4().hex[:6]}
    client = redis.Redis.from_url(svc.broker_url)
    before = client.info("memory")["used_memory"]
    services_cpu = _cpu_seconds(svc.weed_pid), _cpu_seconds(svc.redis_pid)
    load = os.getloadavg()[0]
    command = [
        sys.executable, "-m", "producer", "enqueue", "diffusiondb", "--path", str(path),
        "--shard-size", str(shard_size), "--model", "tiny", "--job", job,
        "--output", f"s3://{svc.buckets[0]}/runs", "--json", *extra,
    ]  # fmt: skip
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"enqueue failed ({proc.returncode}):\n{stderr}")
    after = client.info("memory")["used_memory"]
    weed_cpu, redis_cpu = (
        _cpu_seconds(svc.weed_pid) - services_cpu[0],
        _cpu_seconds(svc.redis_pid) - services_cpu[1],
    )
    summary = json.loads(stdout)
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "redis_used_memory_growth_mb": round((after - before) / 2**20, 2),
        "cpu_user_s": round(usage.ru_utime, 2),
        "cpu_system_s": round(usage.ru_stime, 2),
        "seaweedfs_cpu_s": round(weed_cpu, 2),
        "redis_cpu_s": round(redis_cpu, 2),
        "load_average_1min_before": round(load, 2),
        "prompts": summary.get("prompts"),
        "shards": summary.get("shards"),
        "enqueued": summary.get("enqueued"),
        "duplicates": summary.get("duplicates"),
        "queue_length": client.llen(summary["queue"]),
        "command": " ".join(command[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000], help="Table sizes to time.")
    parser.add_argument(
        "--row-group-rows",
        type=int,
        default=None,
        help="Rows per row group [all in one, as pandas wrote in 2022].",
    )
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "fewstep-bench")
    parser.add_argument("--repeat", type=int, default=1, help="Enqueues per size (each a new job).")
    parser.add_argument("--extra", default="", help="More enqueue flags, e.g. '--dedupe'.")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"machine": _machine()}), flush=True)
    state = Path(tempfile.mkdtemp(prefix="services-", dir=args.data))
    svc = services.start(state, ["bench"])
    try:
        for rows in args.rows:
            groups = args.row_group_rows or rows
            path = args.data / f"metadata-{rows}-rg{groups}.parquet"
            if not path.exists():
                t = time.perf_counter()
                write_metadata(path, rows, groups)
                size = path.stat().st_size / 2**20
                print(f"# wrote {path} ({size:.0f} MiB) in {time.perf_counter() - t:.0f}s", flush=True)
            meta = pq.ParquetFile(path).metadata
            for i in range(args.repeat):
                result = run_enqueue(path, svc, f"bench-{rows}-{i}-{uuid.uuid4().hex[:4]}", args.shard_size,
                                     args.extra.split())  # fmt: skip
                result.update(
                    rows=rows, row_groups=meta.num_row_groups, file_mib=round(path.stat().st_size / 2**20)
                )
                print(json.dumps(result), flush=True)
    finally:
        svc.stop()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
