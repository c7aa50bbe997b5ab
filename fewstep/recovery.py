"""Bring a dead worker's shard back to the queue in a minute or two, not after the visibility timeout.

kombu's Redis transport keeps every delivered, unacknowledged message in the ``unacked``
hash (with its delivery time, by the *consuming* worker's clock, in ``unacked_index``) and
puts it back on its queue only once it is older than the visibility timeout: an hour by
default, kept that long so that live, slow shards are not handed to a second worker. A
worker killed by SIGKILL, the OOM killer or a lost host never acknowledges, so its shard
would wait that hour.

**Liveness.** Every running worker publishes, from a thread of its own, a key
``fewstep.worker.<worker-id>`` naming the delivery tags it holds (running, reserved, or
waiting for a retry countdown), every ``liveness_seconds``, with a ``liveness_ttl`` that Redis
expires on its own clock; its id is also in the set ``fewstep.workers``, so a recoverer reads
the fleet's keys with one ``SMEMBERS`` and one ``MGET`` instead of scanning the keyspace.

**The proof.** A delivery is restored only when a :class:`Recoverer` saw it unnamed by every
liveness key in every one of its scans over at least ``restore_after`` seconds of its own
monotonic clock, scans never further apart than two thirds of the TTL (so no publish can fall
between two of them unseen): its worker then published nothing for at least ``liveness_ttl +
restore_after`` seconds. No other host's clock enters the decision: not the consuming
worker's ``unacked_index`` stamp, not a heartbeat's time. A gap in the scans (Redis down,
this process paused, leadership lost) starts every observation again. The restore itself is
a Lua script that first checks the message is the one observed: the same ``unacked`` value
*and* the same ``unacked_index`` score (a redelivery has an identical value but a new score),
then moves it back to the front of its queue (RPUSH: consumers BRPOP from that end), marked
redelivered as kombu does.

**One recoverer per broker.** Workers elect one (``fewstep.recoverer``, a lease renewed
each scan); the others only publish. ``producer reconcile`` observes the same way for its
job's queue, for up to ``restore_after`` plus two scans, and restores what it proved dead.

A worker paused for longer than ``liveness_ttl + restore_after`` (SIGSTOP, a VM paused,
swapping) loses its shard to another worker: the shard runs twice, and the commit protocol
(``worker/commit.py``) lets exactly one attempt commit, each attempt writing its own objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from fewstep.contract import ShardMessage
from fewstep.queue import message_of_envelope
from fewstep.settings import defaults

LIVENESS_PREFIX = "fewstep.worker."
#: The set of worker ids that have published liveness (expired ones are pruned by recoverers).
WORKERS = "fewstep.workers"
#: The elected recoverer's lease: its worker id, with a TTL.
RECOVERER = "fewstep.recoverer"
# kombu's Redis transport defaults (Channel.unacked_key, Channel.unacked_index_key).
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
#: ``HMGET`` batch when reading ``unacked``.
READ_BATCH = 500

# Put the message back only if it is still the very delivery observed: same value, same
# delivery score. An ack, kombu's own restore, another recoverer or a redelivery since
# (identical value, new score) makes it a no-op.
_RESTORE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[3]) then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[4])
return 1
"""

# Forget a worker id whose liveness key has expired (not one that published again meanwhile).
_PRUNE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], ARGV[1]) end
return 0
"""

# Take or keep the recoverer's lease; true when ARGV[1] holds it now.
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def liveness_key(worker_id: str) -> str:
    return f"{LIVENESS_PREFIX}{worker_id}"


def publish_liveness(client: redis.Redis, worker_id: str, queue: str, tags: set[str], ttl: float) -> None:
    """Say for ``ttl`` seconds (Redis' clock) that ``worker_id`` is alive and holds these tags."""
    record = {"worker": worker_id, "queue": queue, "tags": sorted(tags), "at": time.time()}
    pipe = client.pipeline(transaction=True)
    pipe.set(liveness_key(worker_id), json.dumps(record), px=max(1, int(ttl * 1000)))
    pipe.sadd(WORKERS, worker_id)
    pipe.execute()


def withdraw_liveness(client: redis.Redis, worker_id: str) -> None:
    """A worker that stops says so (its messages are acked or requeued by then)."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(liveness_key(worker_id))
    pipe.srem(WORKERS, worker_id)
    pipe.execute()


def live_tags(client: redis.Redis) -> set[str]:
    """Delivery tags named by live workers (those whose liveness key has not expired)."""
    ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in client.smembers(WORKERS))
    tags: set[str] = set()
    if not ids:
        return tags
    prune = client.register_script(_PRUNE)
    for worker, raw in zip(ids, client.mget([liveness_key(w) for w in ids]), strict=True):
        if raw is None:
            prune(keys=[liveness_key(worker), WORKERS], args=[worker])
            continue
        try:
            tags.update(str(t) for t in json.loads(raw)["tags"])
        except (TypeError, ValueError, KeyError):
            continue  # not ours
    return tags


def lead(client: redis.Redis, worker_id: str, lease: float) -> bool:
    """Whether ``worker_id`` is (now) the broker's one recoverer; renews its lease."""
    return bool(client.register_script(_LEAD)(keys=[RECOVERER], args=[worker_id, max(1, int(lease * 1000))]))


def resign(client: redis.Redis, worker_id: str) -> None:
    """Give up the recoverer's lease if ``worker_id`` holds it (a worker that stops)."""
    client.register_script(_RESIGN)(keys=[RECOVERER], args=[worker_id])


@dataclass
class Recovery:
    """What one scan (or an observation of several) found."""

    restored: list[ShardMessage] = field(default_factory=list)
    held_by_live_workers: int = 0
    watching: int = 0  # unnamed, not yet for long enough to be proven dead

    def to_json(self) -> dict[str, Any]:
        return {
            "restored": [f"{m.job_url}#{m.shard}" for m in self.restored],
            "held_by_live_workers": self.held_by_live_workers,
            "watching": self.watching,
        }


@dataclass
class _Unnamed:
    since: float  # the recoverer's monotonic clock, at the first scan that found it unnamed
    raw: bytes
    score: float


def _deliveries(client: redis.Redis) -> Iterable[tuple[str, float, bytes]]:
    """(tag, index score, raw value) of every unacknowledged message, in batches."""
    index = client.zrange(UNACKED_INDEX, 0, -1, withscores=True)
    for start in range(0, len(index), READ_BATCH):
        batch = index[start : start + READ_BATCH]
        tags = [t.decode() if isinstance(t, bytes) else str(t) for t, _score in batch]
        for tag, (_t, score), raw in zip(tags, batch, client.hmget(UNACKED, tags), strict=True):
            if raw is not None:
                yield tag, float(score), raw


class Recoverer:
    """Restores deliveries proven dead by its own successive scans (see the module's text)."""

    def __init__(
        self,
        client: redis.Redis,
        queues: Callable[[str], bool],
        ttl: float,
        restore_after: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.queues = queues
        self.ttl = ttl
        self.restore_after = restore_after
        # Two scans further apart could miss a whole publish (a third of the TTL is the margin
        # for the scan's own time and the two clocks' rates).
        self.max_gap = ttl * 2 / 3
        self.clock = clock
        self._unnamed: dict[str, _Unnamed] = {}
        self._last_scan: float | None = None
        self._script = client.register_script(_RESTORE)

    def forget(self) -> None:
        """Start every observation again (a scan failed, or this process lost the lead)."""
        self._unnamed.clear()
        self._last_scan = None

    def scan(self) -> Recovery:
        """One scan: note what is unnamed, restore what stayed unnamed long enough."""
        now = self.clock()
        if self._last_scan is None or now - self._last_scan > self.max_gap:
            self._unnamed.clear()  # a gap: nothing seen before it proves anything
        found = Recovery()
        try:
            live = live_tags(self.client)  # before the deliveries: a tag delivered after is only unnamed
            seen = set()
            for tag, score, raw in _deliveries(self.client):
                message, envelope, queue = _fewstep_message(raw)
                if message is None or not self.queues(queue):
                    continue
                seen.add(tag)
                if tag in live:
                    found.held_by_live_workers += 1
                    self._unnamed.pop(tag, None)
                    continue
                known = self._unnamed.get(tag)
                if known is None or known.raw != raw or known.score != score:
                    self._unnamed[tag] = _Unnamed(now, raw, score)
                    found.watching += 1
                elif now - known.since < self.restore_after:
                    found.watching += 1
                elif self._script(
                    keys=[UNACKED, UNACKED_INDEX, queue], args=[tag, raw, repr(score), _redelivered(envelope)]
                ):
                    found.restored.append(message)
                    del self._unnamed[tag]
            for tag in set(self._unnamed) - seen:
                del self._unnamed[tag]  # acknowledged or restored by someone else
        except BaseException:
            self.forget()
            raise
        self._last_scan = now
        return found


def _fewstep_message(raw: bytes) -> tuple[ShardMessage | None, dict[str, Any], str]:
    try:
        envelope, _exchange, routing_key = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None, {}, ""
    if not isinstance(envelope, dict) or not isinstance(routing_key, str):
        return None, {}, ""
    if envelope.get("properties", {}).get("priority"):
        return None, {}, ""  # not a plain fewstep message: kombu's own restore handles it
    return message_of_envelope(envelope), envelope, routing_key


def recovery_settings() -> dict[str, float]:
    """``[recovery]`` of config/defaults.toml, checked: the proof needs its inequalities."""
    cfg = {k: float(v) for k, v in defaults()["recovery"].items()}
    if cfg["restore_after"] < cfg["liveness_ttl"] + cfg["liveness_seconds"]:
        raise ValueError("[recovery] restore_after must be at least liveness_ttl + liveness_seconds")
    if cfg["scan_seconds"] > cfg["liveness_ttl"] / 3:
        raise ValueError("[recovery] scan_seconds must be at most a third of liveness_ttl")
    return cfg


def recover_dead_deliveries(client: redis.Redis, queues: set[str]) -> Recovery:
    """Observe ``queues``' deliveries for up to ``restore_after`` plus two scans, restoring those
    proven dead (``producer reconcile``); returns at once when every delivery is named."""
    cfg = recovery_settings()
    recoverer = Recoverer(client, queues.__contains__, cfg["liveness_ttl"], cfg["restore_after"])
    total = Recovery()
    end = time.monotonic() + cfg["restore_after"] + 2 * cfg["scan_seconds"]
    while True:
        found = recoverer.scan()
        total.restored += found.restored
        total.held_by_live_workers = found.held_by_live_workers
        total.watching = found.watching
        if not found.watching or time.monotonic() >= end:
            return total
        time.sleep(cfg["scan_seconds"])


def _redelivered(envelope: dict[str, Any]) -> str:
    # As kombu's Channel._do_restore_message: the task sees delivery_info["redelivered"].
    envelope = json.loads(json.dumps(envelope))
    envelope.setdefault("headers", {})["redelivered"] = True
    envelope.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
    return json.dumps(envelope)
