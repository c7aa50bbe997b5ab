"""Reading a shard's attempt records (``attempts/part-N/<attempt-id>.json``), for worker and producer.

The worker writes them (``worker/commit.py``); the worker counts failures from them, and
:class:`ShardEvidence` turns them and the commit marker into the proofs that ``producer gc``
and ``producer reconcile`` act on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from fewstep.contract import (
    ATTEMPT_ERROR,
    ATTEMPT_INTERRUPTED,
    ATTEMPT_RUNNING,
    ATTEMPT_STORAGE_UNAVAILABLE,
    ATTEMPT_SUPERSEDED,
    attempts_prefix,
    heartbeat_key,
    heartbeat_live,
    metadata_key,
)
from fewstep.settings import defaults
from fewstep.storage import KeyMissing, Store, read_table

log = logging.getLogger("fewstep")


def history(store: Store, shard: int) -> list[dict[str, Any]]:
    """Every attempt record of a shard, oldest first (ids sort by time)."""
    records = []
    for key, _size in sorted(store.list(attempts_prefix(shard))):
        if not key.endswith(".json"):
            continue
        try:
            record = json.loads(store.get(key))
        except (ValueError, KeyMissing):
            log.warning("unreadable attempt record %s ignored", key)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def running_elsewhere(store: Store, records: list[dict[str, Any]], me: str | None = None) -> set[str]:
    """Ids of the "running" attempts whose worker is still at them.

    A shard redelivered while its first attempt still runs (past a short visibility timeout,
    or restored by recovery while its worker was only slow) has a "running" record that is no
    failure: only a record whose worker is gone was abandoned. Gone means: the record names
    ``me`` (this very worker, which is not running it: an earlier process with the same id),
    or its heartbeat says it ran on this host under a process id that no longer exists (a
    restarted worker need not wait for the heartbeat to go stale), or its heartbeat is stale
    or names another attempt.
    """
    now = dt.datetime.now(dt.UTC)
    stale_after = float(defaults()["status"]["stale_after_intervals"])
    live: set[str] = set()
    for record in records:
        worker = record.get("worker")
        if record.get("state") != ATTEMPT_RUNNING or not isinstance(worker, str) or worker == me:
            continue
        try:
            beat = json.loads(store.get(heartbeat_key(worker)))
        except (KeyMissing, ValueError):
            continue
        if (
            isinstance(beat, dict)
            and beat.get("attempt_id") == record.get("id")
            and heartbeat_live(beat, now, stale_after)
            and not _process_gone(beat)
        ):
            live.add(str(record["id"]))
    return live


def _process_gone(beat: dict[str, Any]) -> bool:
    """Whether a heartbeat's process ran on this host and has exited."""
    pid = beat.get("pid")
    if beat.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


# --- evidence for destructive actions (producer gc, reconcile's upload abort) -------------

#: Attempt states written once an attempt's task is over without a commit of its own: a
#: later delivery of the shard writes under its own attempt id.
ENDED_STATES = frozenset(
    {ATTEMPT_ERROR, ATTEMPT_SUPERSEDED, ATTEMPT_INTERRUPTED, ATTEMPT_STORAGE_UNAVAILABLE}
)


@dataclass
class ShardEvidence:
    """What storage proves about one shard's attempts, read records first, marker second.

    The two proofs (docs/RELIABILITY.md, "Destructive actions on proof"):

    - **committed**: the marker exists and names attempt A. It was written with
      ``If-None-Match: *``, so no other attempt can ever commit: everything of any other
      attempt is garbage, forever.
    - **ended before its commit**: the attempt's own record says it ended (``ENDED_STATES``)
      and that it never sent the marker PUT (``commit_sent: false``, which the worker turns
      true before it sends it). Its task is over, so it writes nothing the shard can name.
      A record that ended after sending the marker PUT (a lost response) may have
      committed: it is kept until a marker settles the question. A ``running`` record is
      never taken as ended, whatever its age or its worker's heartbeat says.
    """

    shard: int
    records: dict[str, dict[str, Any]]
    committed: str | None  # the attempt the marker names; None when there is no marker
    marker_unreadable: bool = False

    @classmethod
    def read(cls, store: Store, shard: int) -> ShardEvidence:
        records = {str(r.get("id")): r for r in history(store, shard)}
        # After the records: a marker that appears meanwhile is seen.
        try:
            ids = set(read_table(store, metadata_key(shard), ["attempt_id"]).column("attempt_id").to_pylist())
        except KeyMissing:
            return cls(shard, records, None)
        except (ValueError, OSError, KeyError, pa.ArrowException):
            return cls(shard, records, None, marker_unreadable=True)
        if len(ids) != 1:
            return cls(shard, records, None, marker_unreadable=True)
        return cls(shard, records, str(ids.pop()))

    @property
    def is_committed(self) -> bool:
        return self.committed is not None or self.marker_unreadable

    def ended_before_commit(self, attempt_id: str) -> bool:
        """The attempt's record says it ended and never sent the commit marker's PUT."""
        record = self.records.get(attempt_id)
        return (
            record is not None and record.get("state") in ENDED_STATES and record.get("commit_sent") is False
        )

    def can_never_be_named(self, attempt_id: str) -> bool:
        """No commit names, or can come to name, what this attempt wrote (its images, tar,
        parquet, embeddings): the proof gc deletes on."""
        if self.marker_unreadable:
            return False  # a marker exists but cannot be read: keep everything
        if self.committed is not None:
            return attempt_id != self.committed
        return self.ended_before_commit(attempt_id)

    def upload_abandoned(self, attempt_id: str) -> bool:
        """An unfinished multipart upload of this attempt can never be completed by it, or be
        needed: the shard is committed (the committed object was complete before its marker),
        or the attempt's record says it ended (its writer finished or gave up before that)."""
        if self.is_committed:
            return True
        record = self.records.get(attempt_id)
        return record is not None and record.get("state") in ENDED_STATES
