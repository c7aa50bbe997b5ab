"""``producer reconcile JOB``: send again every shard that is neither committed, failed nor queued.

It first puts back on the queue the shards of workers that died holding them (no liveness
key in Redis; see :mod:`fewstep.recovery`): they would otherwise count as queued until the
visibility timeout.

Storage is the record of what is done; Redis only holds what is still to do, and it can
forget (flushed, restarted without persistence, a message lost between delivery and
``unacked``). Reconciling compares the two and re-sends what is missing, exactly as
``enqueue`` does when it is run again on an existing job. It also aborts partial uploads
left under the job by writers that died mid-upload.
"""

from __future__ import annotations

import json
from typing import Any

import click

from fewstep.queue import check_broker, redis_client
from fewstep.recovery import restore_orphans
from fewstep.settings import defaults
from fewstep.storage import Store
from producer.enqueue import resend_open_shards
from producer.options import JSON, OUTPUT, abandoned_after, job_store
from producer.progress import read_progress


def reconcile(store: Store, abandoned_after: float) -> dict[str, Any]:
    """Restore dead workers' shards, re-send the job's open, unqueued shards; abort its abandoned
    partial uploads."""
    progress = read_progress(store)
    check_broker()
    queue = progress.spec["queue"]
    recovery = restore_orphans(redis_client(), queue, float(defaults()["recovery"]["min_age"]))
    summary = resend_open_shards(store, progress)
    summary["restored_from_dead_workers"] = len(recovery.restored)
    summary["held_by_live_workers"] = recovery.held_by_live_workers
    summary["delivered_too_recently"] = recovery.too_recent
    summary["aborted_uploads"] = store.abort_abandoned_uploads(abandoned_after)
    return summary


@click.command("reconcile")
@click.argument("job")
@OUTPUT
@abandoned_after("Abort partial uploads under the job that started longer ago than this.")
@JSON
def reconcile_command(job: str, output: str, abandoned_after: float, as_json: bool) -> None:
    """Re-enqueue every shard of JOB with no commit marker that is not queued (after a Redis loss)."""
    summary = reconcile(job_store(output, job), abandoned_after)
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"{summary['job']}: {summary['enqueued']} shards sent again to {summary['queue']} "
        f"({summary['already_done']} committed, {summary['already_queued']} already queued, "
        f"{summary['aborted_uploads']} abandoned uploads aborted); "
        f"{summary['restored_from_dead_workers']} messages of dead workers put back on the queue "
        f"({summary['held_by_live_workers']} held by live workers, "
        f"{summary['delivered_too_recently']} delivered too recently to judge)"
    )
