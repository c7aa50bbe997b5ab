"""The worker's liveness in Redis, and the recovery of dead workers' shards (``fewstep/recovery.py``).

A thread refreshes ``fewstep.worker.<worker-id>`` every ``liveness_seconds`` with the
delivery tags this worker holds, and every ``scan_seconds`` restores the messages of its
queue that no live worker holds. Both are best effort: with Redis down they wait for it,
and the thread never holds up the worker's shutdown (it is a daemon; the key expires).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fewstep.queue import redis_client
from fewstep.recovery import publish_liveness, restore_orphans, withdraw_liveness
from fewstep.settings import defaults, describe_error

log = logging.getLogger("fewstep.worker")


def _snapshot(collection) -> list:
    # Another thread (the consumer) may change it while we copy: copy again.
    for _ in range(5):
        try:
            return list(collection)
        except RuntimeError:
            continue
    return []


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
    """Publishes this worker's liveness and restores dead workers' messages, in a thread."""

    def __init__(self, worker_id: str, queue: str, held: Callable[..., set[str]] = held_delivery_tags):
        cfg = defaults()["recovery"]
        self.worker_id = worker_id
        self.queue = queue
        self.held = held
        self.interval = float(cfg["liveness_seconds"])
        self.ttl = float(cfg["liveness_ttl"])
        self.scan_every = float(cfg["scan_seconds"])
        self.min_age = float(cfg["min_age"])
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._client = None
        self._consumer = None
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def start(self, sender=None, **_) -> Liveness:
        """Start the thread (also a receiver of Celery's ``worker_ready`` signal, whose sender is
        the consumer: its channel knows the messages delivered and not yet acknowledged)."""
        self._consumer = sender if sender is not None else self._consumer
        if not self._thread.is_alive() and not self._stopped.is_set():
            self._thread.start()
        return self

    def beat_now(self, **_) -> None:
        """Publish now (a task was received: name its tag before a recoverer looks)."""
        self._wake.set()

    def stop(self, **_) -> None:
        """Stop publishing and withdraw the key (best effort: Redis may be gone)."""
        self._stopped.set()
        self._wake.set()
        try:
            if self._client is not None:
                withdraw_liveness(self._client, self.worker_id)
        except Exception:  # the key expires by itself
            pass

    def _run(self) -> None:
        last_scan = 0.0
        warned = False
        while not self._stopped.is_set():
            try:
                self._client = self._client or redis_client()
                held = self.held(self._consumer)
                publish_liveness(self._client, self.worker_id, self.queue, held, self.ttl)
                if time.monotonic() - last_scan >= self.scan_every:
                    last_scan = time.monotonic()
                    found = restore_orphans(self._client, self.queue, self.min_age)
                    for message in found.restored:
                        log.warning(
                            "restored shard %d of %s from a worker that is gone (no liveness in Redis)",
                            message.shard,
                            message.job_url,
                        )
                warned = False
            except Exception as e:  # Redis away: the worker's consumer notices that itself
                if not warned:
                    log.warning("liveness not published: %s", describe_error(e, 300))
                    warned = True
            self._wake.wait(self.interval)
            self._wake.clear()
