"""An optional Prometheus endpoint on the worker (``worker --metrics-port``).

Everything is read at scrape time: the worker's :class:`~worker.heartbeat.Activity`
(images committed, shards by outcome, recent images/s, busy) and the depth of the
model's queue in Redis. Nothing here runs on the task path.
"""

from __future__ import annotations

import logging

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fewstep import UserError
from fewstep.queue import queue_length, redis_client
from worker.heartbeat import Activity

log = logging.getLogger("fewstep.worker")


class WorkerCollector(Collector):
    """The worker's metrics, collected on each scrape."""

    def __init__(self, activity: Activity, queue: str):
        self.activity = activity
        self.queue = queue
        self._redis = None

    def collect(self):
        a = self.activity
        labels = ["worker", "model", "device"]
        values = [a.worker, a.model, a.device]
        simple = [
            (
                CounterMetricFamily,
                "fewstep_worker_images",
                "Images in shards this worker committed.",
                a.images_total,
            ),
            (
                CounterMetricFamily,
                "fewstep_worker_busy_seconds",
                "Seconds spent running shards.",
                a.busy_seconds,
            ),
            (
                GaugeMetricFamily,
                "fewstep_worker_images_per_second",
                "Images per second of work over the shards finished in the last 5 minutes.",
                a.images_per_s() or 0.0,
            ),
            (GaugeMetricFamily, "fewstep_worker_busy", "1 while a shard runs.", 1.0 if a.working else 0.0),
        ]
        for family, name, documentation, value in simple:
            metric = family(name, documentation, labels=labels)
            metric.add_metric(values, value)
            yield metric

        shards = CounterMetricFamily(
            "fewstep_worker_shards",
            "Shards this worker ran, by outcome (committed, skipped, discarded, failure, retry).",
            labels=[*labels, "outcome"],
        )
        for outcome, count in sorted(a.shard_outcomes.items()):
            shards.add_metric([*values, outcome], count)
        yield shards

        depth = GaugeMetricFamily(
            "fewstep_queue_depth",
            "Shards waiting in the model's queue (not yet delivered).",
            labels=["queue"],
        )
        up = GaugeMetricFamily("fewstep_queue_up", "1 when Redis answered this scrape.", labels=["queue"])
        try:
            self._redis = self._redis or redis_client()
            depth.add_metric([self.queue], queue_length(self._redis, self.queue))
            up.add_metric([self.queue], 1.0)
        except Exception:  # Redis away: say so, keep the other metrics
            self._redis = None
            up.add_metric([self.queue], 0.0)
        yield depth
        yield up


def serve_metrics(activity: Activity, queue: str, port: int, address: str) -> None:
    """Serve ``/metrics`` on ``address:port`` from a daemon thread."""
    REGISTRY.register(WorkerCollector(activity, queue))
    try:
        start_http_server(port, addr=address)
    except OSError as e:
        raise UserError(f"cannot serve metrics on {address}:{port}: {e.strerror}") from None
    log.info("metrics on http://%s:%d/metrics", address, port)
