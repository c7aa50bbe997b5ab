"""``producer retry JOB --failed``: give failed shards another round of attempts.

For each shard marked failed (and not committed) it records a ``retry_requested``
attempt (keeping the failure for the record; earlier failures stop counting), removes
``failed/part-N.json`` and sends the shard again with the next attempt round.

A failed marker removed is always followed by a send, whatever the queue seems to hold: a
message delivered but not yet acknowledged (the worker that just marked the shard failed
acknowledges it after writing the marker) is no message to count on, and a duplicate costs
at most a skip (a committed shard is skipped by the worker). Were the send to fail (Redis
gone), the command says so and which shards wait for ``producer reconcile``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click

from fewstep import UserError
from fewstep.contract import ATTEMPT_RETRY_REQUESTED, attempt_key, failed_key, new_attempt_id
from fewstep.queue import check_broker
from fewstep.storage import KeyMissing, Store
from producer.enqueue import send_job_shards
from producer.options import JSON, OUTPUT, job_store
from producer.progress import read_progress

RETRY_THREADS = 16


def _request_retry(store: Store, shard: int) -> int | None:
    """Record a ``retry_requested`` attempt for a failed shard and remove its failed marker;
    the shard's next round, or None when someone else retried it meanwhile."""
    try:
        marker = json.loads(store.get(failed_key(shard)))
    except KeyMissing:
        return None
    round_ = int(marker.get("round", 1)) + 1
    attempt_id = new_attempt_id()
    record = {
        "id": attempt_id,
        "shard": shard,
        "round": round_,
        "state": ATTEMPT_RETRY_REQUESTED,
        "requested_at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "failed": marker,
    }
    store.put(attempt_key(shard, attempt_id), json.dumps(record).encode())
    store.delete(failed_key(shard))
    return round_


def retry_failed(store: Store) -> dict[str, Any]:
    """Re-send every failed shard of the job; returns what was done.

    Each shard is three requests to storage (read the marker, record the attempt, remove
    the marker): a few threads do them, so a job with thousands of failed shards is quick.
    """
    check_broker()
    progress = read_progress(store)
    spec = progress.spec
    failed = sorted(progress.failed)
    with ThreadPoolExecutor(RETRY_THREADS, thread_name_prefix="retry") as pool:
        next_rounds = list(pool.map(lambda shard: _request_retry(store, shard), failed))
    rounds: dict[int, list[int]] = defaultdict(list)
    retried = []
    for shard, round_ in zip(failed, next_rounds, strict=True):
        if round_ is None:
            continue  # retried by someone else meanwhile
        retried.append(shard)
        rounds[round_].append(shard)
    try:
        sent = sum(send_job_shards(spec, shards, attempt=round_) for round_, shards in rounds.items())
    except Exception as e:
        raise UserError(
            f"{len(retried)} failed shards were un-failed but could not all be sent ({e}); "
            f"`producer reconcile {spec['job']}` sends them"
        ) from None
    return {
        "job": spec["job"],
        "queue": spec["queue"],
        "retried": retried,
        "enqueued": sent,
    }


@click.command("retry")
@click.argument("job")
@OUTPUT
@click.option("--failed", "failed", is_flag=True, help="Re-send the shards marked failed.")
@JSON
def retry_command(job: str, output: str, failed: bool, as_json: bool) -> None:
    """Give the failed shards of JOB another round of attempts."""
    if not failed:
        raise UserError("say what to retry: --failed (the shards marked failed)")
    summary = retry_failed(job_store(output, job))
    if as_json:
        click.echo(json.dumps(summary))
        return
    if not summary["retried"]:
        click.echo(f"{summary['job']}: no failed shards")
        return
    click.echo(f"{summary['job']}: {len(summary['retried'])} failed shards sent again to {summary['queue']}")
