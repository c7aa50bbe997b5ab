"""Reading a shard's attempt records (``attempts/part-N/<attempt-id>.json``), for worker and producer.

The worker writes them (``worker/commit.py``); the worker counts failures from them and
``producer gc`` decides from them which attempt folders can never be committed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
from typing import Any

from fewstep.contract import ATTEMPT_RUNNING, attempts_prefix, heartbeat_key, heartbeat_live
from fewstep.settings import defaults
from fewstep.storage import KeyMissing, Store

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
