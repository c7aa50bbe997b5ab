"""One shard: manifest → generate → encode → upload → commit.

Generation runs in the calling thread while earlier batches are encoded and uploaded
by a thread pool (Pillow and boto3 release the GIL). At most ``max_batches_in_flight``
batches wait for their uploads, so memory stays flat when storage is slower than the
model. The metadata parquet, the commit marker, is written last and only if absent:
of two racing attempts exactly one commits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import socket
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fewstep import UserError
from fewstep.contract import (
    JOB_SPEC_KEY,
    ShardMessage,
    image_key,
    image_name,
    metadata_key,
    metadata_schema,
    part_name,
)
from fewstep.storage import Store, open_store
from worker.commit import ShardGuard, commit
from worker.encode import encode, extension
from worker.model import Model

log = logging.getLogger("fewstep.worker")


class WrongModel(UserError):
    """A shard for another model reached this worker."""


@dataclass
class ShardResult:
    shard: int
    images: int
    committed: bool  # False: another attempt had committed first
    seconds: float
    generate_seconds: float


def _upload(store: Store, key: str, pixels, generation: dict[str, Any]) -> tuple[str, int]:
    data = encode(pixels, generation)
    store.put(key, data)
    return hashlib.sha256(data).hexdigest(), len(data)


class ShardRunner:
    """Runs shards for one loaded model; reused across tasks (and jobs)."""

    def __init__(
        self, model: Model, *, batch_size: int, upload_threads: int = 8, max_batches_in_flight: int = 2
    ):
        self.model = model
        self.batch_size = batch_size
        self.max_batches_in_flight = max_batches_in_flight
        self.pool = ThreadPoolExecutor(upload_threads, thread_name_prefix="upload")
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{model.device}"
        self._specs: dict[str, dict[str, Any]] = {}

    def job_spec(self, store: Store, job_url: str) -> dict[str, Any]:
        if job_url not in self._specs:
            self._specs[job_url] = json.loads(store.get(JOB_SPEC_KEY))
        return self._specs[job_url]

    def run(self, message: ShardMessage, guard: ShardGuard | None = None) -> ShardResult:
        """Generate, upload and commit one shard; ``guard`` may stop it between batches."""
        start = time.perf_counter()
        store = open_store(message.job_url)
        spec = self.job_spec(store, message.job_url)
        if spec["model"]["name"] != self.model.name:
            raise WrongModel(
                f"shard of job {spec['job']} needs model {spec['model']['name']}, "
                f"this worker runs {self.model.name}"
            )
        marker = metadata_key(message.shard)
        if store.exists(marker):
            log.info("%s %s already committed, skipping", spec["job"], part_name(message.shard))
            return ShardResult(message.shard, 0, False, 0.0, 0.0)

        manifest = pq.read_table(io.BytesIO(store.get(message.manifest_key)))
        gen = spec["generation"]
        self.model.use_sampler(gen.get("sampler"))  # the job's sampler; the metadata records it
        ext = extension(gen["format"])
        rows = manifest.to_pydict()
        n = manifest.num_rows
        shard = message.shard
        keys = [image_key(shard, r, ext) for r in rows["row_id"]]
        tokens, limit = self.model.count_tokens(rows["prompt"])

        uploads: list[Future] = []
        in_flight: deque[list[Future]] = deque()
        nsfw: list[bool | None] = []
        gen_ms: list[float] = []
        created: list[dt.datetime] = []
        generate_seconds = 0.0
        for lo in range(0, n, self.batch_size):
            hi = min(lo + self.batch_size, n)
            batch = self.model.generate(
                rows["prompt"][lo:hi],
                rows["seed"][lo:hi],
                steps=gen["steps"],
                guidance=gen["guidance"],
                width=gen["width"],
                height=gen["height"],
            )
            generate_seconds += batch.seconds
            if guard is not None:
                guard.batch_done(hi, uploads)
            now = dt.datetime.now(dt.UTC)
            nsfw += batch.nsfw
            gen_ms += [1000 * batch.seconds / (hi - lo)] * (hi - lo)
            created += [now] * (hi - lo)
            futures = [
                self.pool.submit(_upload, store, keys[i], batch.images[i - lo], gen) for i in range(lo, hi)
            ]
            uploads += futures
            in_flight.append(futures)
            while len(in_flight) > self.max_batches_in_flight:
                for f in in_flight.popleft():
                    f.result()
        digests = [f.result() for f in uploads]

        table = self._metadata(spec, message, rows, keys, digests, nsfw, tokens, limit, gen_ms, created)
        committed = commit(store, shard, table, n)
        seconds = time.perf_counter() - start
        if committed:
            log.info(
                "%s %s committed: %d images in %.2fs (%.1f img/s; generate %.2fs)",
                spec["job"],
                part_name(shard),
                n,
                seconds,
                n / seconds if seconds else 0.0,
                generate_seconds,
            )
        else:
            log.warning(
                "%s %s was committed by another attempt first; this attempt is discarded",
                spec["job"],
                part_name(shard),
            )
        return ShardResult(shard, n, committed, seconds, generate_seconds)

    def _metadata(self, spec, message, rows, keys, digests, nsfw, tokens, limit, gen_ms, created) -> pa.Table:
        gen = spec["generation"]
        n = len(keys)
        fields = spec["source"].get("fields", {})
        columns = {
            "image_name": [image_name(r, extension(gen["format"])) for r in rows["row_id"]],
            "prompt": rows["prompt"],
            "part_id": [message.shard] * n,
            "seed": rows["seed"],
            "step": [gen["steps"]] * n,
            "cfg": [gen["guidance"]] * n,
            "sampler": [self.model.sampler] * n,
            "width": [gen["width"]] * n,
            "height": [gen["height"]] * n,
            "model": [self.model.name] * n,
            "model_revision": [self.model.revision] * n,
            "row_id": rows["row_id"],
            "image_key": keys,
            "format": [gen["format"]] * n,
            "sha256": [d[0] for d in digests],
            "bytes": [d[1] for d in digests],
            "nsfw": nsfw,
            "prompt_tokens": tokens,
            "truncated": [bool(limit) and t > limit for t in tokens],
            "source": [spec["source"]["name"]] * n,
            "source_row": rows["source_row"],
            "gen_ms": gen_ms,
            "worker": [self.worker_id] * n,
            "attempt": [message.attempt] * n,
            "created_at": created,
        }
        for name in fields:
            columns[name] = rows[name]
        return pa.Table.from_pydict(columns, schema=metadata_schema(fields))
