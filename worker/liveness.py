"""The worker's liveness in Redis, and the recovery of dead workers' shards (``fewstep/recovery.py``).

One thread refreshes ``fewstep.worker.<worker-id>`` every ``liveness_seconds`` with the
delivery tags this worker holds, and nothing else, so a slow scan never delays it. Another
tries every ``scan_seconds`` to be the broker's one recoverer and, while it is, scans: it
restores the deliveries of every fewstep queue on the broker (whatever their prefix or
model) that its own scans proved dead. Both are
best effort: with Redis down they wait for it, and neither holds up the worker's shutdown
(daemon threads; the key expires).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from fewstep.queue import redis_client
from fewstep.recovery import Recoverer, lead, publish_liveness, recovery_settings, resign, withdraw_liveness
from fewstep.settings import describe_error

log = logging.getLogger("fewstep.worker")


class SnapshotFailed(RuntimeError):
    """A collection kept changing while it was copied: what the worker holds is unknown."""


def _snapshot(collection) -> list:
    # Another thread (the consumer) may change it while we copy: copy again. Never answer
    # "nothing" for "could not tell": an empty tag set would disown a running shard.
    for _ in range(20):
        try:
            return list(collection)
        except RuntimeError:
            time.sleep(0.001)
    raise SnapshotFailed("the worker's held messages changed during 20 copies")


def held_delivery_tags(consumer=None) -> set[str]:
    """Delivery tags of every message this Celery worker holds: running, reserved, or waiting for
    a retry countdown (``celery.worker.state.requests``), and any delivered but not yet
    acknowledged (kombu's QoS of the consumer's channel: a finished task's message stays there
    until its ack is flushed, after the request left ``state.requests``)."""
    from celery.worker import state

    tags = set()
    for request in _snapshot(state.requests.values()):
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is not None:
            tags.add(str(tag))
    qos = getattr(getattr(getattr(consumer, "task_consumer", None), "channel", None), "qos", None)
    delivered = getattr(qos, "_delivered", None)
    if delivered is not None:
        dirty = set(_snapshot(getattr(qos, "_dirty", ())))
        tags.update(str(tag) for tag in _snapshot(delivered.keys()) if tag not in dirty)
    return tags


class Liveness:
    """Publishes this worker's liveness, and restores dead workers' messages while it leads."""

    def __init__(self, worker_id: str, queue: str, held: Callable[..., set[str]] = held_delivery_tags):
        cfg = recovery_settings()
        self.worker_id = worker_id
        self.queue = queue
        self.held = held
        self.interval = cfg["liveness_seconds"]
        self.ttl = cfg["liveness_ttl"]
        self.scan_every = cfg["scan_seconds"]
        self.restore_after = cfg["restore_after"]
        self._last_tags: set[str] = set()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._consumer = None
        self._threads = [
            threading.Thread(target=self._publish_loop, name="liveness", daemon=True),
            threading.Thread(target=self._recover_loop, name="recoverer", daemon=True),
        ]

    def start(self, sender=None, **_) -> Liveness:
        """Start the threads (also a receiver of Celery's ``worker_ready`` signal, whose sender is
        the consumer: its channel knows the messages delivered and not yet acknowledged)."""
        self._consumer = sender if sender is not None else self._consumer
        for thread in self._threads:
            if not thread.is_alive() and not self._stopped.is_set():
                thread.start()
        return self

    def beat_now(self, **_) -> None:
        """Publish now (a task was received: name its tag at once)."""
        self._wake.set()

    def stop(self, **_) -> None:
        """Stop publishing and withdraw the key (best effort: Redis may be gone)."""
        self._stopped.set()
        self._wake.set()
        with contextlib.suppress(Exception):  # the key and the lease expire by themselves
            client = redis_client()
            withdraw_liveness(client, self.worker_id)
            resign(client, self.worker_id)

    def _held(self) -> set[str]:
        try:
            self._last_tags = self.held(self._consumer)
        except SnapshotFailed as e:
            log.warning("liveness: %s; publishing the tags held last time", e)
        return self._last_tags

    def _publish_loop(self) -> None:
        client, warned = None, False
        while not self._stopped.is_set():
            try:
                client = client or redis_client()
                publish_liveness(client, self.worker_id, self.queue, self._held(), self.ttl)
                warned = False
            except Exception as e:  # Redis away: the worker's consumer notices that itself
                if not warned:
                    log.warning("liveness not published: %s", describe_error(e, 300))
                    warned = True
            self._wake.wait(self.interval)
            self._wake.clear()

    def _recover_loop(self) -> None:
        client = None
        recoverer: Recoverer | None = None
        while not self._stopped.wait(self.scan_every):
            try:
                client = client or redis_client()
                # Every fewstep queue on the broker: one recoverer serves the whole fleet.
                recoverer = recoverer or Recoverer(client, lambda _queue: True, self.ttl, self.restore_after)
                if not lead(client, self.worker_id, 3 * self.scan_every):
                    recoverer.forget()  # another worker recovers; a later lead starts afresh
                    continue
                for message in recoverer.scan().restored:
                    log.warning(
                        "restored shard %d of %s: no live worker named its delivery for %.0fs",
                        message.shard,
                        message.job_url,
                        self.ttl + self.restore_after,
                    )
            except Exception as e:  # Redis away: the observation starts again (Recoverer.scan)
                if recoverer is not None:
                    recoverer.forget()
                log.info("recovery scan skipped: %s", describe_error(e, 300))
