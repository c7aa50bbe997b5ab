"""Worker heartbeats: where a worker's beat is stored and when it counts as alive."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from fewstep.contract.keys import WORKERS


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO-8601 time (naive ones taken as UTC), or None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def heartbeat_age(beat: dict[str, Any], now: dt.datetime) -> float | None:
    """Seconds since a heartbeat object was written; None when it has no readable time."""
    seen = parse_time(beat.get("last_seen"))
    return (now - seen).total_seconds() if seen else None


def heartbeat_live(beat: dict[str, Any], now: dt.datetime, stale_after_intervals: float) -> bool:
    """Whether a heartbeat belongs to a worker still running: recent (within a few of its own
    intervals) and not saying ``stopped``. The one rule for status and attempt liveness."""
    age = heartbeat_age(beat, now)
    interval = beat.get("interval_s") if isinstance(beat.get("interval_s"), int | float) else 5.0
    return age is not None and age <= stale_after_intervals * interval and beat.get("state") != "stopped"


def heartbeat_key(worker_id: str) -> str:
    """A worker's heartbeat object; the id is reduced to characters safe in keys."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", worker_id).strip(".-")[:200] or "worker"
    return f"{WORKERS}/{safe}.json"
