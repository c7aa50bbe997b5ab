"""A shard's rows on their way through the stages: the shard as opened, one attempt's per-row
results and counters, and the metadata columns made of them.

Every stage writes to its own rows of a :class:`ShardRun` (the device thread a batch's
results, the upload threads its keys and digests through the writer), so the metadata of
rows [lo, hi) can be read as soon as their batch is uploaded: the tar's ``.json`` members
and the parquet layout's columns, and at the end the commit marker's rows.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from fewstep.contract import (
    CANDIDATE_COLUMNS,
    CONDITION_COLUMNS,
    SCORE_COLUMNS,
    ShardMessage,
    image_name,
    job_layout,
    job_metadata_schema,
    job_saves_control,
    part_name,
)
from fewstep.storage import Store
from worker.commit import ShardGuard
from worker.conditioning import ShardConditioning
from worker.encode import ImageFormat
from worker.scoring import BatchScores
from worker.writer import ShardWriter, shard_writer

if TYPE_CHECKING:  # worker.generate opens no shard: it only reads them
    from worker.candidates import Candidates
    from worker.generate import Generated


@dataclass
class OpenShard:
    """A shard ready to generate: message, job spec, manifest rows. Its image keys belong to
    an attempt (:class:`ShardRun`): a shard read ahead has no attempt yet."""

    message: ShardMessage
    spec: dict[str, Any]
    store: Store
    rows: dict[str, list]
    image_format: ImageFormat
    tokens: list[int]
    token_limit: int
    #: Image-conditioned jobs: the rows' conditioning images, being prepared ahead (None: text-only).
    conditioning: ShardConditioning | None = None
    #: Best-of-K jobs: K and how candidates are ranked and kept (None: one image a prompt).
    candidates: Candidates | None = None

    @property
    def label(self) -> str:
        """``job part-000042``, for logs."""
        return f"{self.spec['job']} {part_name(self.message.shard)}"

    @property
    def size(self) -> int:
        """Rows (images) in the shard."""
        return len(self.rows["row_id"])

    @property
    def resolution(self) -> tuple[int, int]:
        """The (width, height) the job asks for: batch sizes are kept per resolution."""
        gen = self.spec["generation"]
        return int(gen["width"]), int(gen["height"])

    def is_for(self, message: ShardMessage) -> bool:
        """Whether ``message`` asks for this very shard (any attempt)."""
        m = self.message
        return (m.job_url, m.shard, m.manifest_key) == (message.job_url, message.shard, message.manifest_key)

    def close(self) -> None:
        """Stop preparing its conditioning images (a shard done, failed or read ahead for nothing)."""
        if self.conditioning is not None:
            self.conditioning.close()


class ShardRun:
    """One attempt at a shard going through the stages: its image keys, per-row results,
    stage timings, completion."""

    def __init__(
        self,
        shard: OpenShard,
        attempt_id: str,
        guard: ShardGuard | None = None,
        describe: Callable[[ShardRun, int, int], dict[str, list]] | None = None,
    ):
        self.shard = shard
        self.guard = guard
        self.attempt_id = attempt_id
        # Where the images go, by the job's layout; each attempt writes only its own objects.
        self.writer: ShardWriter = shard_writer(
            job_layout(shard.spec),
            shard.store,
            shard.message.shard,
            attempt_id,
            shard.rows["row_id"],
            shard.image_format.extension,
            describe=lambda lo, hi: describe(self, lo, hi),
            schema=job_metadata_schema(shard.spec),
            control=job_saves_control(shard.spec),
        )
        n = shard.size
        self.batch_size = self.min_batch_size = self.oom_retries = 0  # see _count_batch_size
        self.nsfw: list[bool | None] = [None] * n
        # Per-row values of format-4 columns (scores, conditioning), set by the stages that
        # compute them; a column nobody set is null.
        self.extra: dict[str, list] = {}
        self.embeddings: np.ndarray | None = None  # (rows, dim) float16, with --embeddings
        self._embedded = np.zeros(n, dtype=bool)  # rows whose embedding is set
        self.score_s = 0.0
        self.gen_ms: list[float] = [0.0] * n
        self.created: list[dt.datetime | None] = [None] * n
        self.generate_s = self.encode_s = self.encode_cpu_s = self.upload_s = self.wait_s = 0.0
        self.uploaded = 0
        self.images_generated = 0  # by the model: K a prompt with --candidates K
        self.gpu_s = 0.0  # device time of the shard's batches (Generated.device_s)
        self.batches_ahead = 0
        self.first_batch_at: dt.datetime | None = None
        self.sampler = ""  # what generated the shard's batches (recorded in the metadata)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._open_batches = 0
        self._generating = True

    def add(self, stage: str, seconds: float) -> None:
        """Add to a stage's time (``generate_s``, ``encode_s``, ...); called from any stage."""
        with self._lock:
            setattr(self, stage, getattr(self, stage) + seconds)

    def fail(self, error: BaseException) -> None:
        """Record the shard's first error: later batches are neither generated nor uploaded."""
        with self._lock:
            if self.error is None:
                self.error = error

    def record_batch(self, generated: Generated) -> None:
        """Keep what the device made of a batch besides the images: its time, the batch size it
        ran at, each row's results (device thread, before the batch is handed to the encode and
        upload stages)."""
        (lo, hi), batch = generated.rows, generated.batch
        n = hi - lo
        self.first_batch_at = self.first_batch_at or generated.started
        self.add("generate_s", generated.busy[1] - generated.busy[0])
        self.add("gpu_s", generated.device_s or generated.busy[1] - generated.busy[0])
        self._count_batch_size(generated)
        self.sampler = generated.sampler
        self.nsfw[lo:hi] = batch.nsfw
        self.gen_ms[lo:hi] = [1000 * batch.seconds / n] * n
        self.created[lo:hi] = [generated.created] * n
        self.images_generated += generated.generated or n
        if generated.scores is not None:
            self.record_scores(lo, hi, generated.scores)
        for column, values in (generated.candidates or {}).items():
            self.extra.setdefault(column, [None] * self.shard.size)[lo:hi] = values

    def record_scores(self, lo: int, hi: int, scores: BatchScores) -> None:
        """Keep a batch's scores (rows [lo, hi)) for the metadata and its embeddings for the
        embeddings object (device thread, before the batch is handed to the upload stage)."""
        for column, values in scores.columns.items():
            self.extra.setdefault(column, [None] * self.shard.size)[lo:hi] = values
        if scores.embeddings is not None:
            if self.embeddings is None:
                self.embeddings = np.zeros((self.shard.size, scores.embeddings.shape[1]), np.float16)
            self.embeddings[lo:hi] = scores.embeddings
            self._embedded[lo:hi] = True
        self.add("score_s", scores.seconds)

    def embeddings_complete(self) -> np.ndarray:
        """Every row's embedding, or an error naming the first row without one."""
        if self.embeddings is None or not self._embedded.all():
            missing = int(np.argmin(self._embedded))
            row = self.shard.rows["row_id"][missing]
            raise RuntimeError(f"{self.shard.label}: row {row} has no embedding")
        return self.embeddings

    def _count_batch_size(self, generated: Generated) -> None:
        """``batch_size`` is the size the shard started with, ``min_batch_size`` the smallest
        it ran at after halvings."""
        if not self.batch_size:
            self.batch_size = (*generated.too_large, generated.batch_size)[0]
        self.min_batch_size = min(self.min_batch_size or generated.batch_size, generated.batch_size)
        self.oom_retries += len(generated.too_large)

    def batch_started(self) -> None:
        """A generated batch entered the encode and upload stages."""
        with self._lock:
            self._open_batches += 1

    def batch_settled(self, uploaded: int) -> None:
        """Every image of a batch is uploaded (``uploaded`` of them) or given up."""
        with self._lock:
            self._open_batches -= 1
            self.uploaded += uploaded
            self._check_done()

    def generation_finished(self) -> None:
        """The device is done with this shard (all batches generated, or stopped by an error)."""
        with self._lock:
            self._generating = False
            self._check_done()

    def _check_done(self) -> None:
        if not self._generating and self._open_batches == 0:
            self.done.set()


@dataclass(frozen=True)
class Maker:
    """What every row records of the worker that made it (read when the columns are made:
    the worker's speed options are settled after the runner is built)."""

    model: str
    model_revision: str | None
    dtype: str
    worker: str
    vae: str
    encoder: Callable[[ImageFormat], str]


def metadata_columns(run: ShardRun, lo: int, hi: int, maker: Maker) -> dict[str, list]:
    """The metadata of the shard's rows [lo, hi), column by column: the commit marker's
    rows, and the tar's ``.json`` members and the parquet layout's columns."""
    shard, writer = run.shard, run.writer
    spec, message, rows = shard.spec, shard.message, shard.rows
    gen, f = spec["generation"], shard.image_format
    n = hi - lo
    fields = spec["source"].get("fields", {})
    tokens = shard.tokens[lo:hi]
    digests = writer.digests[lo:hi]
    columns = {
        "image_name": [image_name(r, f.extension) for r in rows["row_id"][lo:hi]],
        "prompt": rows["prompt"][lo:hi],
        "part_id": [message.shard] * n,
        "seed": run.extra.get("seed", rows["seed"])[lo:hi],  # best-of-K: the kept candidate's
        "step": [gen["steps"]] * n,
        "cfg": [gen["guidance"]] * n,
        "sampler": [run.sampler] * n,
        "width": [gen["width"]] * n,
        "height": [gen["height"]] * n,
        "model": [maker.model] * n,
        "model_revision": [maker.model_revision] * n,
        "row_id": rows["row_id"][lo:hi],
        "image_key": writer.keys[lo:hi],
        "format": [f.name] * n,
        "sha256": [d and d[0] for d in digests],
        "bytes": [d and d[1] for d in digests],
        "nsfw": run.nsfw[lo:hi],
        "prompt_tokens": tokens,
        "truncated": [bool(shard.token_limit) and t > shard.token_limit for t in tokens],
        "source": [spec["source"]["name"]] * n,
        "source_row": rows["source_row"][lo:hi],
        "gen_ms": run.gen_ms[lo:hi],
        "worker": [maker.worker] * n,
        "attempt": [message.attempt] * n,
        "attempt_id": [run.attempt_id] * n,
        "created_at": run.created[lo:hi],
        "format_quality": [f.quality] * n,
        "png_level": [f.png_level] * n,
        "encoder": [maker.encoder(f)] * n,
        "dtype": [maker.dtype] * n,
        "vae": [maker.vae] * n,
        "image_offset": writer.offsets[lo:hi],
        "image_row": writer.image_rows[lo:hi],
    }
    for name in SCORE_COLUMNS + CONDITION_COLUMNS + CANDIDATE_COLUMNS:
        values = run.extra.get(name)
        columns[name] = values[lo:hi] if values is not None else [None] * n
    if job_saves_control(spec):
        columns["control_key"] = writer.control_keys[lo:hi]
        columns["control_offset"] = writer.control_offsets[lo:hi]
        columns["control_bytes"] = writer.control_sizes[lo:hi]
    for name in fields:
        columns[name] = rows[name][lo:hi]
    return columns


def metadata_table(run: ShardRun, maker: Maker) -> pa.Table:
    """The shard's metadata, every row, in the job's schema: the commit marker's table."""
    schema = job_metadata_schema(run.shard.spec)  # a job of an older format has fewer columns
    columns = metadata_columns(run, 0, run.shard.size, maker)
    return pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)
