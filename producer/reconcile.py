"""``producer reconcile JOB``: send again every shard that is neither committed, failed nor queued.

It first puts back on the queue the shards of workers that died holding them (no liveness
key in Redis; see :mod:`fewstep.recovery`): they would otherwise count as queued until the
visibility timeout.

Storage is the record of what is done; Redis only holds what is still to do, and it can
forget (flushed, restarted without persistence, a message lost between delivery and
``unacked``). Reconciling compares the two and re-sends what is missing, exactly as
``enqueue`` does when it is run again on an existing job.

It also aborts unfinished uploads (S3 multipart uploads, a local output's temporary files)
of the job's attempts, each only on proof that nobody will finish it or need it, re-read
right before the abort (:meth:`fewstep.attempts.ShardEvidence.upload_abandoned`): its shard
is committed, or its attempt's own record says the attempt ended. An upload of a running
attempt is never aborted, however old: a shard may stream its tar for hours. Uploads that
belong to no attempt (another tool's) are left alone. ``--abandoned-after`` only delays.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from typing import Any

import click

from fewstep.attempts import ShardEvidence
from fewstep.contract import IMAGES, image_key_attempt
from fewstep.queue import check_broker, redis_client
from fewstep.recovery import recover_dead_deliveries
from fewstep.storage import PendingUpload, Store
from producer.enqueue import resend_open_shards
from producer.options import JSON, OUTPUT, abandoned_after, job_store
from producer.progress import read_progress


def abort_ended_uploads(store: Store, min_age: float) -> dict[str, int]:
    """Abort the job's unfinished uploads whose attempt ended or whose shard is committed."""
    by_shard: dict[int, list[tuple[str, PendingUpload]]] = defaultdict(list)
    counts = {"aborted_uploads": 0, "kept_uploads_of_live_attempts": 0, "kept_uploads_not_an_attempts": 0}
    for upload in store.pending_uploads(f"{IMAGES}/"):
        owner = image_key_attempt(upload.key)
        if owner is None:
            counts["kept_uploads_not_an_attempts"] += 1
        else:
            by_shard[owner[0]].append((owner[1], upload))
    now = dt.datetime.now(dt.UTC)
    for shard, uploads in sorted(by_shard.items()):
        evidence = ShardEvidence.read(store, shard)  # read right before this shard's aborts
        for attempt, upload in uploads:
            old_enough = (now - upload.initiated).total_seconds() >= min_age
            if old_enough and evidence.upload_abandoned(attempt):
                counts["aborted_uploads"] += int(store.abort_upload(upload))
            else:
                counts["kept_uploads_of_live_attempts"] += 1
    return counts


def reconcile(store: Store, abandoned_after: float) -> dict[str, Any]:
    """Restore dead workers' shards, re-send the job's open, unqueued shards; abort the uploads of
    its ended attempts."""
    progress = read_progress(store)
    check_broker()
    recovery = recover_dead_deliveries(redis_client(), {progress.spec["queue"]})
    summary = resend_open_shards(store, progress)
    summary["restored_from_dead_workers"] = len(recovery.restored)
    summary["held_by_live_workers"] = recovery.held_by_live_workers
    summary["unnamed_not_yet_proven_dead"] = recovery.watching
    summary.update(abort_ended_uploads(store, abandoned_after))
    return summary


@click.command("reconcile")
@click.argument("job")
@OUTPUT
@abandoned_after("Delay only: an ended attempt's unfinished upload is aborted once it started this long ago.")
@JSON
def reconcile_command(job: str, output: str, abandoned_after: float, as_json: bool) -> None:
    """Re-enqueue every shard of JOB with no commit marker that is not queued (after a Redis loss)."""
    summary = reconcile(job_store(output, job), abandoned_after)
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"{summary['job']}: {summary['enqueued']} shards sent again to {summary['queue']} "
        f"({summary['already_done']} committed, {summary['already_queued']} already queued); "
        f"{summary['aborted_uploads']} uploads of ended attempts aborted "
        f"({summary['kept_uploads_of_live_attempts']} of attempts that may still finish kept); "
        f"{summary['restored_from_dead_workers']} messages of dead workers put back on the queue "
        f"({summary['held_by_live_workers']} held by live workers, "
        f"{summary['unnamed_not_yet_proven_dead']} unnamed but not yet proven dead)"
    )
