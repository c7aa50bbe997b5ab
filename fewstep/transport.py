"""kombu's Redis transport, with a delivery path that survives any message on the queue.

kombu decodes what BRPOP returns in its event loop, outside any handler of Celery's: an
entry that is not JSON, not a JSON object, whose body is not valid base64, or whose
properties are missing raises out of the consumer, Celery logs "Unrecoverable error" and
the worker stops. Headers that are not an object with a string ``task`` and ``id`` get
further, into Celery's unknown-task handler, which raises too. One such message (another
app's, damaged, hostile) would stop every worker of its queue in turn.

:class:`GuardedRedisTransport` (selected by ``broker_transport`` in
:func:`fewstep.queue.celery_app`) checks each delivered entry before kombu builds its
message and drops what it cannot deliver with one log line. BRPOP has already removed the
entry from its queue and kombu has not yet written it to ``unacked`` (that happens when the
message is built), so a dropped entry is gone from Redis and cannot come back in a loop.
Everything else is kombu's, unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Message

log = logging.getLogger("fewstep.queue")


def envelope_problem(raw: Any, channel: Any) -> str | None:
    """Why kombu or Celery could not take the decoded queue entry ``raw``, or None when they can."""
    if not isinstance(raw, dict):
        return f"not a JSON object ({type(raw).__name__})"
    properties = raw.get("properties")
    if not isinstance(properties, dict):
        return "properties missing or not an object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "delivery_tag missing or not a string"
    info = properties.get("delivery_info")
    routed = isinstance(info, dict) and all(isinstance(info.get(k), str) for k in ("exchange", "routing_key"))
    if not routed:
        return "delivery_info missing or without exchange and routing key"
    headers = raw.get("headers")
    # Celery's unknown-task path reads headers["id"] and ["task"] and raises when they are not there.
    if not isinstance(headers, dict) or not all(isinstance(headers.get(k), str) for k in ("task", "id")):
        return "headers not an object with a task name and an id"
    if not isinstance(raw.get("body", ""), str):
        return "body not a string"
    try:
        Message(raw, channel=channel)  # kombu's own decoding: a bad base64 body raises here
    except Exception as e:  # whatever kombu's constructor chokes on
        return f"body cannot be decoded ({type(e).__name__}: {str(e)[:200]})"
    return None


class GuardedChannel(kombu_redis.Channel):
    """A Redis channel whose consumers only ever see entries kombu and Celery can handle."""

    #: Set when the entry of the current read reached its consumer (whose errors are its own).
    _handed_over = False

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        """Consume ``queue`` as kombu does, behind :func:`envelope_problem`."""
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        deliver = self.connection._callbacks[queue]

        def guarded(raw):
            problem = envelope_problem(raw, self)
            if problem is not None:
                log.error("dropped a malformed message from queue %s: %s", queue, problem)
                return None
            self._handed_over = True
            return deliver(raw)

        self.connection._callbacks[queue] = guarded
        return result

    def _brpop_read(self, **options):
        # kombu parses the popped entry as JSON before any consumer sees it: an entry that is
        # not JSON (or not UTF-8) raises here. Errors of the connection, of an empty poll and
        # of the consumer itself (the task, in the solo pool) stay kombu's and Celery's.
        self._handed_over = False
        try:
            return super()._brpop_read(**options)
        except (*self.connection_errors, kombu_redis.Empty):
            raise
        except Exception as e:
            if self._handed_over:
                raise
            log.error("dropped a malformed message (not JSON): %s: %s", type(e).__name__, str(e)[:200])
            return True


class GuardedRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`GuardedChannel` (``redis://`` and ``rediss://``)."""

    Channel = GuardedChannel
