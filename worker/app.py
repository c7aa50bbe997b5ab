"""The worker's Celery app and its one task.

The model is loaded by ``worker.cli`` before the worker starts consuming, in the
process that runs the tasks (the solo pool: nothing forks after CUDA is initialised).

Delivery is at-least-once (late acks; a killed worker's shard comes back after the
visibility timeout), so the task is idempotent: it skips a committed or failed shard,
counts its attempt in storage, and commits through :mod:`worker.commit`. What happens
to the message:

- committed, or found committed by another attempt: acknowledged;
- storage unavailable: sent again later (``retry``), not counted as a failure;
- any other error: sent again later until ``max_attempts`` failures, then the shard is
  marked failed and the message acknowledged, so it no longer blocks the queue;
- the worker shuts down and the grace period runs out: rejected back onto the queue.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.exceptions import Reject
from celery.platforms import EX_FAILURE
from celery.worker import state as worker_state

from fewstep.attempts import history, running_elsewhere
from fewstep.contract import (
    ATTEMPT_COMMITTED,
    ATTEMPT_ERROR,
    ATTEMPT_INTERRUPTED,
    ATTEMPT_STORAGE_UNAVAILABLE,
    ATTEMPT_SUPERSEDED,
    TASK_NAME,
    ShardMessage,
    failed_key,
    metadata_key,
    part_name,
    shard_rows,
)
from fewstep.queue import celery_app
from fewstep.settings import defaults, describe_error, visibility_timeout
from fewstep.storage import (
    StorageAccessError,
    StorageUnavailable,
    Store,
    check_conditional_writes,
    open_store,
)
from worker import commit
from worker.commit import Attempt, ShardGuard, ShutdownRequested, Superseded
from worker.shard import ShardRunner

log = logging.getLogger("fewstep.worker")

app = celery_app()

#: Set once at start-up, before the first task.
runner: ShardRunner | None = None
#: Seconds the shard in progress may still run after SIGTERM (set at start-up).
shutdown_grace: float = float(defaults()["worker"]["shutdown_grace"])
#: The shard this worker is running, for the shutdown message.
_in_progress: str | None = None


@signals.worker_shutting_down.connect
def _on_shutting_down(how: str = "Warm", **_: Any) -> None:
    # Runs in the signal handler, on top of the task (solo pool): only note the deadline;
    # the shard loop checks it between batches.
    grace = 0.0 if how == "Cold" else shutdown_grace
    commit.shutdown.request(grace)
    if _in_progress:
        log.warning("shutting down: %s has %.0fs to finish, then goes back to the queue", _in_progress, grace)


def _backoff(first: float, retries: int) -> int:
    # ETA messages wait in Redis' unacked set: keep the wait well inside the visibility timeout.
    return int(min(first * 2**retries, 300, visibility_timeout() / 4))


@app.task(name=TASK_NAME, bind=True, max_retries=None)
def generate_shard(self, job_url: str, shard: int, manifest_key: str, attempt: int = 1) -> dict:
    """Generate, upload and commit one shard. Arguments are references only."""
    if runner is None:
        raise RuntimeError("worker started without a model")
    global _in_progress
    message = ShardMessage(job_url, shard, manifest_key, attempt)
    cfg = defaults()["worker"]
    part = part_name(shard)
    try:
        _in_progress = f"{part} of {job_url}"
        store = open_store(job_url)
        check_conditional_writes(store)  # once per bucket; refused like a bad credential
        commit.flush_unwritten()
        return _run(self, store, message, int(cfg["max_attempts"]), float(cfg["error_retry_delay"]))
    except StorageAccessError as e:
        # A worker storage refuses would fail every shard and drain the queue: stop it instead.
        log.error("storage refuses this worker (%s): stopping; %s goes back to the queue", e, part)
        worker_state.should_stop = EX_FAILURE
        raise Reject(str(e), requeue=True) from None
    except StorageUnavailable as e:
        if self.request.retries >= int(cfg["storage_retries"]):
            log.error("%s of %s: storage still unavailable, giving up on this message: %s", part, job_url, e)
            raise
        countdown = _backoff(float(cfg["storage_retry_delay"]), self.request.retries)
        log.warning("%s of %s: storage unavailable (%s); retrying in %ds", part, job_url, e, countdown)
        raise self.retry(exc=e, countdown=countdown) from None
    finally:
        _in_progress = None


def _run(task, store: Store, message: ShardMessage, max_attempts: int, retry_delay: float) -> dict:
    part = part_name(message.shard)
    if store.exists(metadata_key(message.shard)):
        log.info("%s of %s already committed, skipping", part, message.job_url)
        return {"shard": message.shard, "state": "already committed"}
    if store.exists(failed_key(message.shard)):
        log.info("%s of %s is marked failed, skipping", part, message.job_url)
        return {"shard": message.shard, "state": "failed"}
    records = history(store, message.shard)
    failures = commit.failures_since_retry(records, running_elsewhere(store, records, runner.worker_id))
    if len(failures) >= max_attempts:
        # The earlier attempts lost their workers (killed, out of memory) or outlived the
        # visibility timeout: a shard that keeps coming back must stop.
        commit.mark_failed(store, message.shard, failures, message.attempt)
        return {"shard": message.shard, "state": "failed"}

    delivery = {
        "redelivered": bool((task.request.delivery_info or {}).get("redelivered")),
        "task_retries": task.request.retries,
    }
    attempt = Attempt.start(store, message, runner.worker_id, delivery)
    try:
        rows = shard_rows(runner.job_spec(store, message.job_url), message.shard)
        guard = ShardGuard(store, message, rows, visibility_timeout())
        result = runner.run(message, guard=guard, attempt_id=attempt.id)
    except Superseded:
        log.info("%s of %s was committed by another attempt; this one stopped", part, message.job_url)
        attempt.finish(ATTEMPT_SUPERSEDED)
        return {"shard": message.shard, "state": ATTEMPT_SUPERSEDED}
    except ShutdownRequested:
        attempt.finish(ATTEMPT_INTERRUPTED)
        log.warning("%s of %s: shutdown grace over, returning it to the queue", part, message.job_url)
        raise Reject("worker shutting down", requeue=True) from None
    except StorageAccessError:
        raise
    except StorageUnavailable as e:
        attempt.finish(ATTEMPT_STORAGE_UNAVAILABLE, e)
        raise
    except Exception as e:
        attempt.finish(ATTEMPT_ERROR, e)
        failures.append(attempt.record)
        if len(failures) >= max_attempts:
            commit.mark_failed(store, message.shard, failures, message.attempt)
            return {"shard": message.shard, "state": "failed"}
        countdown = _backoff(retry_delay, len(failures) - 1)
        log.warning(
            "%s of %s failed (attempt %d of %d): %s; trying again in %ds",
            part,
            message.job_url,
            len(failures),
            max_attempts,
            describe_error(e),
            countdown,
        )
        raise task.retry(exc=e, countdown=countdown) from None
    state = ATTEMPT_COMMITTED if result.committed else ATTEMPT_SUPERSEDED
    attempt.finish(state, images=result.images, seconds=round(result.seconds, 3))
    return {"shard": result.shard, "images": result.images, "state": state}
