"""A committed shard's stats object (``stats/part-N.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class ShardStats:
    """One committed shard's timings, stored as ``stats/part-N.json`` after its commit.

    Stage times overlap: ``encode_s`` and ``upload_s`` are summed over the pool's threads,
    so they can exceed ``seconds``. ``gpu_idle_fraction`` is the share of ``seconds`` in
    which the model ran no batch (of this shard or, ahead, of the next one).
    """

    job: str
    shard: int
    attempt: int
    worker: str
    model: str
    images: int
    batch_size: int  # the size the shard started with, for its resolution (fixed or measured)
    seconds: float  # wall time of the task, start to commit
    generate_s: float  # model time spent on this shard's batches
    encode_s: float
    encode_cpu_s: float  # CPU time of the encode calls (thread time)
    upload_s: float
    commit_s: float
    wait_s: float  # generation waiting for a free slot: storage or encoding slower than the model
    gpu_idle_fraction: float
    images_per_s: float
    max_batches_in_flight: int
    peak_batches_in_flight: int
    batches_ahead: int  # generated while the previous shard finished, before this one was delivered
    format: dict[str, Any]
    encoder: str
    speed: dict[str, Any]
    first_batch_at: str  # when its first batch began on the device (possibly ahead of started_at)
    started_at: str
    finished_at: str
    stats_version: int = 1
    # Out-of-memory recovery (absent from older stats): batches halved, and the smallest
    # size the shard then ran at (= batch_size when none ran out of memory).
    oom_retries: int = 0
    min_batch_size: int | None = None
    # Storage requests made for the shard's images (absent from older stats): one per image for
    # the files layout, a few per shard for webdataset and parquet. (Older stats also had
    # ``storage_requests``, counted in-process from the task's start to its commit only; a
    # shard's whole life is counted where the requests arrive: ``bench/pipeline.py
    # --count-requests``.)
    image_requests: int = 0
    # Scoring (absent from older stats): device time spent scoring the shard's images
    # (--score, --embeddings), part of generate_s.
    score_s: float = 0.0
    # Images the model generated for the shard (absent from older stats): ``images`` times K
    # with best-of-K (--candidates K --keep best), else ``images``.
    images_generated: int = 0
    # Device time of the shard (absent from older stats): seconds the device thread spent on
    # its batches, model call and scoring, out-of-memory tries that were halved included; not
    # its wall time (encoding, uploads and waits for storage are not in it). What a GPU-hour
    # price applies to (``producer status/report --gpu-price``).
    gpu_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The stats object's JSON fields."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardStats:
        """Parse a stats object, ignoring keys a newer worker may add."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
