"""The commit protocol: attempt records, failed markers and the conditional commit.

A shard is done when its metadata parquet exists. It is written last, only if absent
(``If-None-Match: *``) and only for a complete shard, so of two attempts exactly one
commits and a reader never sees half a shard. Every delivery of a shard is one attempt
with its own record under ``attempts/part-N/``: brokers keep no delivery counter, and
Redis may forget everything, so storage is where attempts are counted. A shard that
failed ``max_attempts`` times gets ``failed/part-N.json`` and stops coming back.

Between batches a :class:`ShardGuard` stops an attempt that has become pointless
(another attempt committed) or must end (the worker's shutdown grace ran out), and
warns when a shard may outlive the broker's visibility timeout.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from fewstep import UserError
from fewstep.contract import (
    ATTEMPT_ERROR,
    ATTEMPT_RETRY_REQUESTED,
    ATTEMPT_RUNNING,
    LAYOUT_FILES,
    LAYOUT_WEBDATASET,
    ShardMessage,
    attempt_images_prefix,
    attempt_key,
    failed_key,
    job_layout,
    metadata_key,
    new_attempt_id,
    part_name,
    shard_object_key,
)
from fewstep.scorers import embeddings_wanted
from fewstep.settings import defaults, describe_error
from fewstep.storage import StorageError, Store, check_conditional_writes, open_store
from worker.scoring import write_embeddings

if TYPE_CHECKING:  # worker.rows needs ShardGuard from here
    from worker.rows import ShardRun

log = logging.getLogger("fewstep.worker")

#: Attempt states that count towards ``max_attempts``. "running" is a record whose worker
#: never wrote an outcome: killed, out of memory, or lost; one whose worker still beats for
#: it is not counted (:func:`fewstep.attempts.running_elsewhere`).
FAILURE_STATES = frozenset({ATTEMPT_ERROR, ATTEMPT_RUNNING})


class Superseded(Exception):
    """Another attempt committed this shard; this one stops without touching it."""


class ShutdownRequested(Exception):
    """The worker is shutting down and the grace period is over: the shard goes back to the queue."""


class IncompleteShard(RuntimeError):
    """The shard is not complete in storage: no commit marker may be written."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# --- attempt records -----------------------------------------------------------


# Outcomes that could not be written while storage was down, written at the next chance,
# so an outage does not leave records that look like crashed attempts.
_unwritten: list[tuple[Store, str, dict[str, Any]]] = []
_unwritten_lock = threading.Lock()


def flush_unwritten() -> None:
    """Write attempt outcomes held back during a storage outage, best effort and quickly.

    Each record is tried once, without retries, and a store that fails is not tried again
    until the next call: a job whose storage is still down costs one failed request, never
    a stall of the other jobs' shards. What fails stays held for the next call.
    """
    with _unwritten_lock:
        held, _unwritten[:] = list(_unwritten), []
    kept, down, quick = [], set(), {}
    for store, key, record in held:
        if store.url not in down:
            try:
                if store.url not in quick:  # one client per store and flush, not one per record
                    quick[store.url] = open_store(store.url, retry_seconds=0)
                quick[store.url].put(key, json.dumps(record).encode())
                continue
            except Exception as e:  # anything a store raises: keep the record
                down.add(store.url)
                log.info("attempt records for %s still unwritten: %s", store.url, describe_error(e, 300))
        kept.append((store, key, record))
    with _unwritten_lock:
        _unwritten[:0] = kept


@dataclass
class Attempt:
    """One delivery of a shard, recorded in storage from its start to its outcome."""

    store: Store
    shard: int
    id: str
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return attempt_key(self.shard, self.id)

    @classmethod
    def start(cls, store: Store, message: ShardMessage, worker: str, delivery: dict[str, Any]) -> Attempt:
        """Record that ``worker`` starts a delivery of the shard (before any image is written)."""
        attempt = cls(store, message.shard, new_attempt_id())
        attempt.record = {
            "id": attempt.id,
            "shard": message.shard,
            "round": message.attempt,
            "worker": worker,
            "state": ATTEMPT_RUNNING,
            "started_at": _now(),
            # Turned true before the commit marker's PUT is sent: an attempt that ended with
            # it false can never have committed (producer gc, fewstep.attempts.ShardEvidence).
            "commit_sent": False,
            **delivery,
        }
        store.put(attempt.key, json.dumps(attempt.record).encode())
        return attempt

    def commit_sending(self) -> None:
        """The marker's PUT is about to be sent: from now on this attempt may have committed,
        whatever its outcome says (a PUT whose answer is lost may have landed). Written with
        the outcome; a worker killed before that leaves a ``running`` record, kept anyway."""
        self.record.update(commit_sent=True, commit_sent_at=_now())

    def finish(self, state: str, error: BaseException | None = None, **details: Any) -> None:
        """Overwrite the record with the outcome; kept for later when storage is down."""
        self.record.update(state=state, ended_at=_now(), **details)
        if error is not None:
            self.record["error"] = describe_error(error)
        try:
            self.store.put(self.key, json.dumps(self.record).encode())
        except (StorageError, UserError):  # unreachable, or its bucket gone: kept for later
            with _unwritten_lock:
                _unwritten.append((self.store, self.key, dict(self.record)))


def failures_since_retry(
    records: list[dict[str, Any]], running: set[str] = frozenset()
) -> list[dict[str, Any]]:
    """The failed or abandoned attempts since the last ``producer retry`` of the shard;
    attempts in ``running`` (:func:`fewstep.attempts.running_elsewhere`) are still at work, not failures."""
    failures: list[dict[str, Any]] = []
    for record in records:
        if record.get("state") == ATTEMPT_RETRY_REQUESTED:
            failures = []
        elif record.get("state") in FAILURE_STATES and record.get("id") not in running:
            failures.append(record)
    return failures


def mark_failed(store: Store, shard: int, failures: list[dict[str, Any]], round_: int) -> None:
    """Write ``failed/part-N.json``: the shard stops coming back until ``producer retry``."""
    errors = [r["error"] for r in failures if r.get("error")]
    lost = sum(1 for r in failures if r.get("state") == ATTEMPT_RUNNING)
    if errors:
        last_error = errors[-1]
    else:
        last_error = "worker lost mid-shard (killed, out of memory, or past the visibility timeout)"
    marker = {
        "shard": shard,
        "part": part_name(shard),
        "round": round_,
        "failed_at": _now(),
        "attempts": len(failures),
        "workers_lost": lost,
        "last_error": last_error,
        "attempt_ids": [r.get("id") for r in failures],
    }
    store.put(failed_key(shard), json.dumps(marker, indent=2).encode())
    log.error(
        "%s marked failed after %d failed attempts (last: %s); `producer retry JOB --failed` sends it again",
        part_name(shard),
        len(failures),
        last_error,
    )


# --- shutdown and the guard ------------------------------------------------------


class Shutdown:
    """When the worker was asked to stop, and until when the shard in progress may run."""

    def __init__(self) -> None:
        self.deadline: float | None = None

    def request(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        if self.deadline is None or deadline < self.deadline:  # a second signal never extends it
            self.deadline = deadline

    @property
    def requested(self) -> bool:
        return self.deadline is not None

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


shutdown = Shutdown()

# Jobs this worker already checked against the visibility timeout (one warning per job).
_timed_jobs: set[str] = set()


class ShardGuard:
    """Called by the shard loop after each generated batch, before its images are uploaded."""

    def __init__(
        self,
        store: Store,
        message: ShardMessage,
        rows: int,
        visibility_timeout: float,
        commit_check_seconds: float | None = None,
    ):
        self.store = store
        self.message = message
        self.rows = rows
        self.visibility_timeout = visibility_timeout
        if commit_check_seconds is None:
            commit_check_seconds = float(defaults()["worker"]["commit_check_seconds"])
        self.commit_check_seconds = commit_check_seconds
        self.started = time.monotonic()
        self._next_commit_check = self.started  # the first batch always checks
        self._late = False

    def batch_done(self, rows_done: int) -> None:
        """Raise :class:`ShutdownRequested` or :class:`Superseded` when the attempt must stop."""
        self._check_time(rows_done)
        if shutdown.expired():
            raise ShutdownRequested(f"{part_name(self.message.shard)}: shutdown grace period over")
        # Before this batch's images are written: stop work another attempt made pointless.
        # Not before every batch: one request per batch would cost more than the images
        # (webdataset, parquet); an attempt's own keys never touch the committed shard anyway.
        now = time.monotonic()
        if now >= self._next_commit_check:
            self._next_commit_check = now + self.commit_check_seconds
            if self.store.exists(metadata_key(self.message.shard)):
                raise Superseded(f"{part_name(self.message.shard)} was committed by another attempt")

    def _check_time(self, rows_done: int) -> None:
        elapsed = time.monotonic() - self.started
        job = self.message.job_url
        if job not in _timed_jobs and rows_done:
            _timed_jobs.add(job)
            estimate = elapsed / rows_done * self.rows
            if estimate > self.visibility_timeout / 2:
                log.warning(
                    "!!! a shard of %s takes about %.0fs at the measured %.2f images/s, more than half "
                    "the broker's visibility timeout (%.0fs): Redis will hand shards to a second "
                    "worker while the first still runs them. Use a smaller --shard-size or raise "
                    "FEWSTEP_VISIBILITY_TIMEOUT on every worker.",
                    job,
                    estimate,
                    rows_done / elapsed if elapsed else 0.0,
                    self.visibility_timeout,
                )
        if not self._late and elapsed > self.visibility_timeout:
            self._late = True
            log.error(
                "%s has run %.0fs, past the visibility timeout (%.0fs): another worker may be running it "
                "too; the first to commit wins",
                part_name(self.message.shard),
                elapsed,
                self.visibility_timeout,
            )


# --- the commit -------------------------------------------------------------------


def failpoint(name: str, shard: int) -> None:
    """Fault tests crash a real worker at an exact point: ``FEWSTEP_FAILPOINT=before-commit:part-000002``
    (or ``mid-upload:part-000002``: half a shard's tar or parquet streamed), or, for
    ``slow-commit:part-000002``, hold the commit marker's PUT ``FEWSTEP_FAILPOINT_SECONDS``
    (15) before sending it, as a PUT retried through ``503 SlowDown`` would be (``slow-commit:*``:
    every shard's)."""
    if os.environ.get("FEWSTEP_FAILPOINT") not in (f"{name}:{part_name(shard)}", f"{name}:*"):
        return
    if name == "slow-commit":
        seconds = float(os.environ.get("FEWSTEP_FAILPOINT_SECONDS", "15"))
        log.warning("failpoint %s reached for %s: waiting %.0fs", name, part_name(shard), seconds)
        time.sleep(seconds)
        return
    log.warning("failpoint %s reached for %s: killing this worker", name, part_name(shard))
    os.kill(os.getpid(), signal.SIGKILL)


def check_complete(store: Store, shard: int, table: pa.Table, rows: int, layout: str = LAYOUT_FILES) -> None:
    """Raise :class:`IncompleteShard` unless every row has its image in storage, in what the
    one attempt the metadata names wrote: its own object of the recorded size (files), or
    its tar or parquet, holding every row's image where the metadata says (webdataset,
    parquet)."""
    if table.num_rows != rows:
        raise IncompleteShard(f"{part_name(shard)}: metadata has {table.num_rows} rows, manifest {rows}")
    for column in ("image_key", "sha256", "bytes", "attempt_id"):
        if table.column(column).null_count:
            raise IncompleteShard(f"{part_name(shard)}: {column} missing for some rows")
    attempt_ids = set(table.column("attempt_id").to_pylist())
    if len(attempt_ids) != 1:
        raise IncompleteShard(f"{part_name(shard)}: rows of {len(attempt_ids)} attempts in one commit")
    attempt_id = attempt_ids.pop()
    keys = table.column("image_key").to_pylist()
    sizes = table.column("bytes").to_pylist()
    if layout != LAYOUT_FILES:
        _check_shard_object(store, shard, table, shard_object_key(shard, attempt_id, layout), layout)
        return
    prefix = attempt_images_prefix(shard, attempt_id)
    if len(set(keys)) != len(keys) or not all(k.startswith(prefix) for k in keys):
        raise IncompleteShard(f"{part_name(shard)}: image keys repeat or lie outside {prefix}")
    # Only this attempt's folder: what other attempts wrote is neither listed nor referenced.
    stored = dict(store.list(prefix))
    wrong = [k for k, size in zip(keys, sizes, strict=True) if stored.get(k) != size]
    if wrong:
        raise IncompleteShard(
            f"{part_name(shard)}: {len(wrong)} of {rows} images missing or of another size in storage "
            f"(first: {wrong[0]})"
        )


def _check_shard_object(store: Store, shard: int, table: pa.Table, key: str, layout: str) -> None:
    if set(table.column("image_key").to_pylist()) != {key}:
        raise IncompleteShard(f"{part_name(shard)}: rows name other objects than {key}")
    size = dict(store.list(key)).get(key)
    if size is None:
        raise IncompleteShard(f"{part_name(shard)}: {key} missing in storage")
    sizes = table.column("bytes").to_pylist()
    if layout == LAYOUT_WEBDATASET:
        offsets = table.column("image_offset").to_pylist()
        spans = sorted(zip(offsets, sizes, strict=True)) if None not in offsets else None
        if (
            not spans
            or spans[-1][0] + spans[-1][1] > size
            or any(a + n > b for (a, n), (b, _m) in itertools.pairwise(spans))
        ):
            raise IncompleteShard(f"{part_name(shard)}: image offsets missing, overlapping or beyond {key}")
    elif sorted(table.column("image_row").to_pylist(), key=lambda r: -1 if r is None else r) != list(
        range(table.num_rows)
    ):
        raise IncompleteShard(f"{part_name(shard)}: image rows of {key} are not 0..{table.num_rows - 1}")


def commit(
    store: Store,
    shard: int,
    table: pa.Table,
    rows: int,
    layout: str = LAYOUT_FILES,
    before_put: Callable[[], None] = lambda: None,
) -> bool:
    """Write the shard's metadata parquet, the commit marker, if absent and the shard is complete.

    ``before_put`` is called right before the marker's PUT is sent (:meth:`Attempt.commit_sending`).

    Returns False when another attempt committed first (this attempt is discarded). Raises
    :class:`~fewstep.storage.ConditionalWritesIgnored` on a backend that would let both win.
    """
    check_conditional_writes(store)  # once per bucket and process
    check_complete(store, shard, table, rows, layout)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    failpoint("before-commit", shard)
    before_put()
    failpoint("slow-commit", shard)
    if store.put(metadata_key(shard), data, if_absent=True):
        return True
    # 412. A PUT retried after a lost response also gets 412 for its own first write: the
    # marker is ours exactly when it holds our bytes (worker id and timestamps differ).
    return store.get(metadata_key(shard)) == data


def commit_run(
    run: ShardRun, metadata: Callable[[], pa.Table], before_put: Callable[[], None] = lambda: None
) -> bool:
    """Finish an attempt whose every image is uploaded, then commit its ``metadata()`` (made
    once the writer is finished: a tar's offsets are known only then) with :func:`commit`:
    False when another attempt committed first. A failure before the marker aborts the
    attempt's writer."""
    shard = run.shard
    try:
        run.writer.finish()  # a tar or parquet is complete in storage only now
        if embeddings_wanted(shard.spec):  # before the commit: a commit implies its embeddings
            write_embeddings(shard.store, shard.message.shard, run.attempt_id, shard.rows["row_id"],
                             run.embeddings_complete())  # fmt: skip
    except BaseException:
        run.writer.abort()
        raise
    # Checked complete, then written only if absent: of two racing attempts one commits.
    layout = job_layout(shard.spec)
    return commit(shard.store, shard.message.shard, metadata(), shard.size, layout, before_put=before_put)
