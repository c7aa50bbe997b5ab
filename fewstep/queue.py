"""Celery wiring shared by the producer (sends) and the worker (consumes).

Redis carries one small message per shard. Everything durable lives in storage,
so results are ignored and a flushed Redis only costs a ``reconcile``.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher

from fewstep import UserError
from fewstep.contract import TASK_NAME, ShardMessage
from fewstep.settings import broker_url, redact_url, visibility_timeout


def broker_tls(url: str) -> dict[str, Any] | None:
    """TLS options for a ``rediss://`` broker URL: verify the server's certificate.

    kombu alone connects to a bare ``rediss://`` URL without verifying it (``CERT_NONE``).
    ``ssl_*`` parameters in the URL's query (``?ssl_ca_certs=/path/ca.pem``) take precedence,
    as in kombu and redis-py.
    """
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED} if urlsplit(url).scheme == "rediss" else None


def transport_options(vt: int) -> dict[str, Any]:
    """kombu's Redis options for a visibility timeout of ``vt`` seconds."""
    # kombu returns a delivered, unacknowledged message to its queue once it is older than
    # the visibility timeout, but looks only every interval × throttle seconds (10 × 10 by
    # default). Look often enough that a shard whose worker was killed comes back soon
    # after the timeout, not minutes later; one sorted-set query per look.
    return {
        "visibility_timeout": vt,
        "unacked_restore_interval": max(1, min(60, vt // 10)),
        "unacked_restore_throttle": 1,
    }


#: kombu's Redis transport with a delivery path that survives malformed entries (imported lazily).
GUARDED_TRANSPORT = "fewstep.transport:GuardedRedisTransport"

#: How often an event (Flower's worker heartbeats, task events) is retried while Redis is down.
EVENT_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}


class BoundedEventDispatcher(EventDispatcher):
    """Celery's event dispatcher, with a bounded retry where Celery asks for an unbounded one.

    Celery sends its periodic ``worker-heartbeat`` event with ``retry=True`` and no policy,
    which kombu reads as "retry forever": with Redis down, the worker's main thread then sits
    in kombu's ``retry_over_time`` and never sees SIGTERM's shutdown request. An event is
    worth a short retry at most (an unsent one is buffered by Celery and sent later).
    """

    def send(self, type, *args, retry=False, retry_policy=None, **fields):
        """Send an event; a retry asked without a policy is bounded by :data:`EVENT_RETRY_POLICY`."""
        if retry and not retry_policy:
            retry_policy = EVENT_RETRY_POLICY
        return super().send(type, *args, retry=retry, retry_policy=retry_policy, **fields)


class BoundedEvents(Events):
    """Celery's events, sent through :class:`BoundedEventDispatcher`."""

    dispatcher_cls = "fewstep.queue:BoundedEventDispatcher"


def celery_app(url: str | None = None) -> Celery:
    """The Celery app with fewstep's locked-down configuration."""
    url = url or broker_url()
    vt = visibility_timeout()
    app = Celery("fewstep", broker=url, set_as_current=False, events=BoundedEvents)
    app.conf.update(
        # JSON only: a pickled message from the broker would be code execution.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        # Outputs live in storage; results would only pile up in Redis.
        task_ignore_result=True,
        result_backend=None,
        # At-least-once: ack after the shard is committed, requeue if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # The three Redis visibility timeouts must agree (the shortest wins).
        broker_transport_options=transport_options(vt),
        result_backend_transport_options={"visibility_timeout": vt},
        visibility_timeout=vt,
        broker_use_ssl=broker_tls(url),
        # kombu's Redis transport, behind a check of every delivered entry: a malformed one is
        # dropped with one log line instead of stopping the worker (fewstep/transport.py).
        broker_transport=GUARDED_TRANSPORT if urlsplit(url).scheme in ("redis", "rediss") else None,
        # Without this a broker reconnect re-runs late-acked tasks while they still run.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_create_missing_queues=True,
        # Task events, so Flower works out of the box.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return app


def redis_client(url: str | None = None) -> redis.Redis:
    """A Redis client for the broker URL (redis:// or rediss://)."""
    url = url or broker_url()
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    except ValueError as e:
        raise UserError(f"invalid broker URL {redact_url(url)}: {e}") from None


def check_broker(url: str | None = None) -> None:
    """Raise :class:`UserError` naming the URL when Redis cannot be used."""
    url = url or broker_url()
    try:
        redis_client(url).ping()
    except redis.AuthenticationError:
        raise UserError(f"Redis at {redact_url(url)} rejected the password") from None
    except redis.ResponseError as e:
        if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
            raise UserError(f"Redis at {redact_url(url)} needs a valid password") from None
        raise UserError(f"Redis at {redact_url(url)} refused: {e}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        raise UserError(f"cannot reach Redis at {redact_url(url)}: {e}") from None


# kombu's Redis transport keeps a queue in a list named after it, plus one list per
# priority step, and delivered-but-unacked messages in a hash.
_PRIORITY_SEP = "\x06\x16"
_UNACKED = "unacked"


def queue_keys(queue: str) -> list[str]:
    return [queue] + [f"{queue}{_PRIORITY_SEP}{p}" for p in (3, 6, 9)]


def queue_length(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a queue (not counting delivered ones)."""
    pipe = client.pipeline()
    for key in queue_keys(queue):
        pipe.llen(key)
    return sum(pipe.execute())


def _task_message(raw: bytes | str) -> ShardMessage | None:
    """The shard message of a raw kombu message, or None if it is not a well-formed fewstep task."""
    try:
        envelope = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None
    return message_of_envelope(envelope)


def message_of_envelope(envelope: Any) -> ShardMessage | None:
    """The shard message of a parsed kombu message, or None if it is not a well-formed fewstep task.

    Total: whatever the queue holds (another app's messages, damaged or hostile ones), the
    readers (status, reconcile, resume, the read-ahead) skip it instead of failing.
    """
    try:
        if envelope.get("headers", {}).get("task") != TASK_NAME:
            return None
        if envelope.get("content-type") != "application/json":
            return None
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body, validate=True)
        args = json.loads(body)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # not a message of ours
        return None
    kwargs = args[1] if isinstance(args, list) and len(args) >= 2 else None
    return ShardMessage.parse(kwargs)


def pending_messages(client: redis.Redis, queue: str) -> Iterator[ShardMessage]:
    """Shard messages waiting in ``queue`` or delivered and not yet acknowledged."""
    for key in queue_keys(queue):
        for raw in client.lrange(key, 0, -1):
            message = _task_message(raw)
            if message is not None:
                yield message
    for raw in client.hvals(_UNACKED):
        try:
            envelope, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError, RecursionError):
            continue
        if routing_key != queue:
            continue
        message = message_of_envelope(envelope)
        if message is not None:
            yield message


def peek_next(client: redis.Redis, queue: str) -> ShardMessage | None:
    """The shard message a consumer of ``queue`` would receive next, left in place (read only).

    kombu LPUSHes and BRPOPs, so the next message is the last of the first non-empty
    priority list. Another worker may still take it first: use it only as a hint.
    """
    for key in queue_keys(queue):
        raw = client.lindex(key, -1)
        if raw is not None:
            return _task_message(raw)
    return None


def send_shards(app: Celery, messages: Iterable[ShardMessage], queue: str) -> int:
    """Put shard messages on a model's queue over one connection; returns how many."""
    sent = 0
    with app.producer_or_acquire() as producer:
        for message in messages:
            app.send_task(
                TASK_NAME,
                kwargs=message.to_kwargs(),
                queue=queue,
                task_id=message.task_id,
                producer=producer,
            )
            sent += 1
    return sent
