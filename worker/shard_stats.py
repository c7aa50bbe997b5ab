"""A committed shard's stats object (``stats/part-N.json``): where its time went.

Informative only: the commit marker says a shard is done; a stats object that could not be
written costs a warning, never the shard.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from fewstep import UserError
from fewstep.contract import ShardStats, part_name, stats_key
from fewstep.storage import StorageError, Store
from worker.rows import Maker, ShardRun

log = logging.getLogger("fewstep.worker")


def now() -> dt.datetime:
    """The time in UTC: what every timestamp of a shard is in."""
    return dt.datetime.now(dt.UTC)


def shard_stats(
    run: ShardRun,
    maker: Maker,
    *,
    start: float,
    end: float,
    commit_s: float,
    started_at: dt.datetime,
    idle_s: float,
    slots: tuple[int, int],
    speed: dict[str, Any],
) -> ShardStats:
    """The stats of a shard run from ``start`` to ``end`` (perf_counter seconds), the device
    idle ``idle_s`` of it; ``slots`` is (batches in flight allowed, the peak reached), ``speed``
    the device, dtype and speed options it ran with."""
    shard, seconds = run.shard, end - start
    images = shard.size
    f = shard.image_format
    return ShardStats(
        job=shard.spec["job"],
        shard=shard.message.shard,
        attempt=shard.message.attempt,
        worker=maker.worker,
        model=maker.model,
        images=images,
        batch_size=run.batch_size,
        min_batch_size=run.min_batch_size,
        oom_retries=run.oom_retries,
        seconds=round(seconds, 6),
        generate_s=round(run.generate_s, 6),
        encode_s=round(run.encode_s, 6),
        encode_cpu_s=round(run.encode_cpu_s, 6),
        upload_s=round(run.upload_s, 6),
        commit_s=round(commit_s, 6),
        score_s=round(run.score_s, 6),
        gpu_s=round(run.gpu_s, 6),
        wait_s=round(run.wait_s, 6),
        gpu_idle_fraction=round(idle_s / seconds, 6) if seconds else 0.0,
        images_per_s=round(images / seconds, 3) if seconds else 0.0,
        max_batches_in_flight=slots[0],
        peak_batches_in_flight=slots[1],
        batches_ahead=run.batches_ahead,
        format={"name": f.name, "quality": f.quality, "png_level": f.png_level},
        encoder=maker.encoder(f),
        speed=speed,
        first_batch_at=run.first_batch_at.isoformat(),
        started_at=started_at.isoformat(),
        finished_at=now().isoformat(),
    )


def write_stats(store: Store, stats: ShardStats) -> None:
    """Put the stats object of a committed shard; a failure is logged, not raised."""
    try:
        store.put(stats_key(stats.shard), json.dumps(stats.to_json(), indent=1).encode())
    except (StorageError, UserError) as e:  # the shard is committed; stats are only informative
        log.warning("%s %s: stats not written: %s", stats.job, part_name(stats.shard), e)
