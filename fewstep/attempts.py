"""Reading a shard's attempt records (``attempts/part-N/<attempt-id>.json``), for worker and producer.

The worker writes them (``worker/commit.py``); the worker counts failures from them and
``producer gc`` decides from them which attempt folders can never be committed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
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


def running_elsewhere(store: Store, records: list[dict[str, Any]]) -> set[str]:
    """Ids of the "running" attempts whose worker is still at them, by its heartbeat.

    A shard redelivered while its first attempt still runs (past a short visibility timeout,
    or restored by recovery while its worker was only slow) has a "running" record that is no
    failure: only a record whose worker stopped beating, or beats for another attempt, was
    abandoned.
    """
    now = dt.datetime.now(dt.UTC)
    stale_after = float(defaults()["status"]["stale_after_intervals"])
    live: set[str] = set()
    for record in records:
        if record.get("state") != ATTEMPT_RUNNING or not isinstance(record.get("worker"), str):
            continue
        try:
            beat = json.loads(store.get(heartbeat_key(record["worker"])))
        except (KeyMissing, ValueError):
            continue
        if (
            isinstance(beat, dict)
            and beat.get("attempt_id") == record.get("id")
            and heartbeat_live(beat, now, stale_after)
        ):
            live.add(str(record["id"]))
    return live
