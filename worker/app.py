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
- the worker shuts down and the grace period runs out, or storage is unavailable while it
  shuts down: rejected back onto the queue.

Whatever is down, a worker sent SIGTERM exits within its grace period plus
``[worker] shutdown_hard_exit_after`` seconds: when the grace is over, storage calls stop
retrying, and a watchdog ends the process if it is still running after that margin
(blocked in a library call that waits for a broker or storage that is gone). What it could
not acknowledge stays in Redis' ``unacked`` hash, and what it could not write is redone by
the next attempt: recovery never depends on a clean exit.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Any

from celery import signals
from celery.exceptions import InvalidTaskError, Reject
from celery.platforms import EX_FAILURE
from celery.worker import state as worker_state
from celery.worker.strategy import default as default_strategy
from kombu.exceptions import ContentDisallowed, DecodeError

from fewstep import UserError
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
    stop_retrying,
)
from worker import commit
from worker.commit import Attempt, ShardGuard, ShutdownRequested, Superseded
from worker.conditioning import ConditionError
from worker.shard import ShardRunner

log = logging.getLogger("fewstep.worker")

app = celery_app()


def gil_switch_interval() -> float:
    """Seconds a thread waiting for the GIL waits before asking its holder to let go:
    ``FEWSTEP_GIL_SWITCH_MS`` or ``[worker] gil_switch_ms``. The device thread asks for the GIL
    after every batch (and a real pipeline between kernel launches) while encode and upload
    threads run Python; Python's default of 5 ms can leave a fast model idle for that long."""
    value = os.environ.get("FEWSTEP_GIL_SWITCH_MS") or defaults()["worker"]["gil_switch_ms"]
    try:
        millis = float(value)
    except ValueError:
        millis = -1.0
    if not 0 < millis <= 100:
        raise UserError(f"FEWSTEP_GIL_SWITCH_MS / [worker] gil_switch_ms must be in (0, 100], not {value!r}")
    return millis / 1000


sys.setswitchinterval(gil_switch_interval())

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
    _start_watchdog(float(defaults()["worker"]["shutdown_hard_exit_after"]))
    if _in_progress:
        log.warning("shutting down: %s has %.0fs to finish, then goes back to the queue", _in_progress, grace)


_watchdog: threading.Thread | None = None


def _start_watchdog(margin: float) -> None:
    """Once per process: end storage retries when the grace is over, and the process ``margin`` later."""
    global _watchdog
    if _watchdog is None:
        _watchdog = threading.Thread(
            target=_watch_shutdown, args=(margin,), name="shutdown-watchdog", daemon=True
        )
        _watchdog.start()


def _watch_shutdown(margin: float) -> None:
    def sleep_until(end: float) -> None:
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))

    # The deadline only ever moves earlier (a second SIGTERM is a cold shutdown): re-read it.
    while (deadline := commit.shutdown.deadline) is not None and time.monotonic() < deadline:
        sleep_until(min(deadline, time.monotonic() + 0.5))
    stop_retrying()
    sleep_until(commit.shutdown.deadline + margin)
    log.error(
        "still running %.0fs after the shutdown grace (broker or storage unreachable): exiting now; "
        "an unacknowledged shard returns through `producer reconcile` or the visibility timeout",
        margin,
    )
    # Where it is stuck, for the operator (and the tests): every thread's stack, once.
    _dump_stacks()
    logging.shutdown()
    os._exit(EX_FAILURE)


def _dump_stacks() -> None:
    with contextlib.suppress(Exception):  # a report, never a reason not to exit
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)


def _backoff(first: float, retries: int) -> int:
    # ETA messages wait in Redis' unacked set: keep the wait well inside the visibility timeout.
    return int(min(first * 2**retries, 300, visibility_timeout() / 4))


def guarded_strategy(task, app, consumer, **options):
    """Celery's default strategy for the shard task, behind a check of each message's shape.

    A message with fewstep's task name whose body is not ``[[], {shard kwargs}, {...}]``
    (another app's, damaged, hostile) is acknowledged and dropped with one log line: left to
    Celery, some shapes raise out of its consumer and stop the worker, others fail in the
    task with a traceback. Undecodable bodies stay with Celery, which logs and drops them.
    """
    handle = default_strategy(task, app, consumer, **options)

    def handler(message, body, ack, reject, callbacks, **kwargs):
        payload = message.payload  # DecodeError / ContentDisallowed: Celery's own handling
        shaped = isinstance(payload, list | tuple) and len(payload) == 3 and payload[0] in ([], ())
        problem = None if shaped and ShardMessage.parse(payload[1]) else "not [[], {shard kwargs}, {...}]"
        if problem is None:
            try:
                return handle(message, body, ack, reject, callbacks, **kwargs)
            except (InvalidTaskError, ContentDisallowed, DecodeError):
                raise
            except Exception as e:  # anything Celery's strategy chokes on
                problem = describe_error(e, 300)
        log.error("dropped a malformed %s message (id %s): %s", TASK_NAME, _message_id(message), problem)
        message.ack()
        return None

    return handler


def _message_id(message) -> str:
    headers = message.headers if isinstance(message.headers, dict) else {}
    return str(headers.get("id"))[:100]


@app.task(name=TASK_NAME, bind=True, max_retries=None, Strategy="worker.app:guarded_strategy")
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
        if commit.shutdown.requested:
            # A retry would be a new message with a countdown; the shard goes back as it came.
            log.warning("%s of %s: storage unavailable while shutting down; returning it to the queue", part,
                        job_url)  # fmt: skip
            raise Reject(str(e), requeue=True) from None
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
        rows = shard_rows(runner.job_spec(store, message.job_url, fresh=True), message.shard)
        guard = ShardGuard(store, message, rows, visibility_timeout())
        result = runner.run(message, guard=guard, attempt_id=attempt.id, before_commit=attempt.commit_sending)
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
    except ConditionError as e:
        # A conditioning image that cannot be read or decoded stays so: no retry, failed at
        # once with the row and source named (``producer retry JOB --failed`` after a fix).
        attempt.finish(ATTEMPT_ERROR, e)
        log.error("%s of %s: %s", part, message.job_url, describe_error(e))
        commit.mark_failed(store, message.shard, [*failures, attempt.record], message.attempt)
        return {"shard": message.shard, "state": "failed"}
    except StorageUnavailable as e:
        # Shutting down, the message goes back to the queue (see generate_shard): interrupted.
        attempt.finish(ATTEMPT_INTERRUPTED if commit.shutdown.requested else ATTEMPT_STORAGE_UNAVAILABLE, e)
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
