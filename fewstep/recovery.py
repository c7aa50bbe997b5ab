"""Bring a dead worker's shard back to the queue within a minute, not after the visibility timeout.

kombu's Redis transport keeps every delivered, unacknowledged message in the ``unacked``
hash (with its delivery time in ``unacked_index``) and puts it back on its queue only
once it is older than the visibility timeout: an hour by default, kept that long so that
live, slow shards are not handed to a second worker. A worker killed by SIGKILL, the OOM
killer or a lost host never acknowledges, so its shard would wait that hour.

Liveness comes from Redis itself: every running worker refreshes a key
``fewstep.worker.<worker-id>`` (a few seconds' TTL) naming the delivery tags it holds
(running, reserved, or waiting for a retry countdown). A message in ``unacked`` that
no live worker names, and that was delivered long enough ago for its worker to have
named it, belongs to a dead worker: :func:`restore_orphans` moves it back to the front
of its queue, atomically (a Lua script that first checks the message is still there,
unchanged), marked redelivered as kombu does. Workers run it every few seconds
(``worker/liveness.py``) and ``producer reconcile`` runs it once.

Restoring the message of a worker that was only cut off from Redis at worst runs the
shard twice: the commit protocol (``worker/commit.py``) lets exactly one attempt commit,
each attempt writing its own image folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from fewstep.contract import ShardMessage
from fewstep.queue import message_of_envelope

LIVENESS_PREFIX = "fewstep.worker."
# kombu's Redis transport defaults (Channel.unacked_key, Channel.unacked_index_key).
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"

# Put the message back only if it is still the same unacknowledged message: an ack, kombu's
# own restore or another recoverer may have taken it since it was read.
_RESTORE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
"""


def liveness_key(worker_id: str) -> str:
    return f"{LIVENESS_PREFIX}{worker_id}"


def publish_liveness(client: redis.Redis, worker_id: str, queue: str, tags: set[str], ttl: float) -> None:
    """Say for ``ttl`` seconds that ``worker_id`` is alive and holds these delivery tags."""
    record = {"worker": worker_id, "queue": queue, "tags": sorted(tags), "at": time.time()}
    client.set(liveness_key(worker_id), json.dumps(record), px=max(1, int(ttl * 1000)))


def withdraw_liveness(client: redis.Redis, worker_id: str) -> None:
    """A worker that stops says so (its messages are acked or requeued by then)."""
    client.delete(liveness_key(worker_id))


def live_tags(client: redis.Redis) -> set[str]:
    """Delivery tags held by live workers (those whose liveness key has not expired)."""
    keys = list(client.scan_iter(match=f"{LIVENESS_PREFIX}*", count=1000))
    tags: set[str] = set()
    for raw in client.mget(keys) if keys else []:
        try:
            record = json.loads(raw)
            tags.update(str(t) for t in record["tags"])
        except (TypeError, ValueError, KeyError):
            continue  # expired between SCAN and MGET, or not ours
    return tags


@dataclass
class Recovery:
    """What one pass of :func:`restore_orphans` found for a queue."""

    restored: list[ShardMessage] = field(default_factory=list)
    held_by_live_workers: int = 0
    too_recent: int = 0  # delivered moments ago: its worker may not have named it yet

    def to_json(self) -> dict[str, Any]:
        return {
            "restored": [f"{m.job_url}#{m.shard}" for m in self.restored],
            "held_by_live_workers": self.held_by_live_workers,
            "too_recent": self.too_recent,
        }


def restore_orphans(client: redis.Redis, queue: str, min_age: float) -> Recovery:
    """Put back on ``queue`` every fewstep message delivered from it at least ``min_age``
    seconds ago that no live worker holds. Other queues' and foreign messages are left alone."""
    found = Recovery()
    live = live_tags(client)  # read before the index: a tag delivered after this is too recent
    now = time.time()
    script = client.register_script(_RESTORE)
    for raw_tag, delivered_at in client.zrange(UNACKED_INDEX, 0, -1, withscores=True):
        tag = raw_tag.decode() if isinstance(raw_tag, bytes) else str(raw_tag)
        raw = client.hget(UNACKED, tag)
        if raw is None:
            continue
        try:
            envelope, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError, RecursionError):
            continue
        if routing_key != queue or not isinstance(envelope, dict):
            continue
        message = message_of_envelope(envelope)
        if message is None or envelope.get("properties", {}).get("priority"):
            continue  # not a plain fewstep message: kombu's own restore handles it
        if tag in live:
            found.held_by_live_workers += 1
        elif now - delivered_at < min_age:
            found.too_recent += 1
        elif script(keys=[UNACKED, UNACKED_INDEX, queue], args=[tag, raw, _redelivered(envelope)]):
            found.restored.append(message)
    return found


def _redelivered(envelope: dict[str, Any]) -> str:
    # As kombu's Channel._do_restore_message: the task sees delivery_info["redelivered"].
    envelope = json.loads(json.dumps(envelope))
    envelope.setdefault("headers", {})["redelivered"] = True
    envelope.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
    return json.dumps(envelope)
