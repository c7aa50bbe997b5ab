"""The next shard, read and started before its message is delivered.

The worker runs Celery's solo pool with late acks and prefetch 1: the next message is
delivered only after this one is acknowledged, which is after its commit. Acking earlier could
lose a shard, so instead the runner reads ahead: a few batches before the end of a shard it
peeks (read only) at the next message in its queue and opens that shard (:class:`Lookahead`);
when the last batch is done, the device goes on with the next shard's first batches, as many
as there are free slots (:meth:`ReadAhead.generate_ahead`), while this shard's last uploads,
its commit, the ack and the next delivery happen. Nothing of the next shard is uploaded before
its message is delivered to this worker; if another worker takes it, those batches are
dropped (:meth:`ReadAhead.claim`). Seeds make them the very batches the task would have
generated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from fewstep.contract import ShardMessage
from fewstep.queue import peek_next, redis_client
from worker.generate import DeviceThread, Generated
from worker.rows import OpenShard
from worker.sink import Slots

log = logging.getLogger("fewstep.worker")


@dataclass
class Ahead:
    """The first batches of a shard, generated before its message was delivered (each holds a slot)."""

    shard: OpenShard
    batches: list[Generated]


class Lookahead:
    """The next shard on this worker's queue, opened before its message is delivered.

    A hint only: another worker may take that message first.
    """

    def __init__(self, queue_name: str | None, open_shard: Callable[[ShardMessage], OpenShard | None]):
        self.queue_name = queue_name
        self._open_shard = open_shard
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lookahead")
        self._future: Future | None = None
        self._client = None

    def start(self, current: ShardMessage) -> None:
        """Peek at the queue and open the next shard in the background."""
        if self.queue_name is not None:
            self._future = self._pool.submit(self._read, current)

    def _read(self, current: ShardMessage) -> OpenShard | None:
        try:
            if self._client is None:
                self._client = redis_client()
            message = peek_next(self._client, self.queue_name)
            if message is None or (message.job_url, message.shard) == (current.job_url, current.shard):
                return None
            return self._open_shard(message)
        except Exception as e:  # a hint that failed costs nothing but the overlap
            log.debug("reading ahead failed: %s", e)
            return None

    def ready(self, timeout: float) -> bool:
        """Whether reading ahead is over (or was never started), waiting up to ``timeout`` seconds."""
        future = self._future
        if future is None:
            return True
        try:
            future.result(timeout=timeout)
        except TimeoutError:
            return False
        return True

    def result(self) -> OpenShard | None:
        """The shard read ahead, if reading ahead is over and found one."""
        future = self._future
        return future.result() if future is not None and future.done() else None

    def take(self, message: ShardMessage) -> OpenShard | None:
        """The shard read ahead if it is the one ``message`` asks for."""
        future, self._future = self._future, None
        if future is None or not future.done():
            return None
        shard = future.result()
        if shard is not None and shard.is_for(message):
            return replace(shard, message=message)
        if shard is not None:
            shard.close()  # its conditioning images were prepared for nothing
        return None

    def close(self) -> None:
        """Stop reading ahead."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class ReadAhead:
    """The next shard's first batches, generated on the device between two tasks."""

    def __init__(
        self, lookahead: Lookahead, device: DeviceThread, slots: Slots, stopping: Callable[[], bool]
    ):
        self.lookahead = lookahead
        self.device = device
        self.slots = slots
        self._stopping = stopping  # a worker shutting down takes no next shard
        self._ahead: Ahead | None = None  # touched by the device thread only

    def claim(self, shard: OpenShard) -> list[Generated]:
        """The batches generated ahead for ``shard`` (device thread); those of another shard
        (which went to another worker) are dropped and their slots freed."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return []
        if ahead.shard.is_for(shard.message):
            return ahead.batches
        for _ in ahead.batches:  # another worker got that shard: drop its batches
            self.slots.free()
        if ahead.batches:
            log.info("%s went to another worker: dropped %d batches generated ahead", ahead.shard.label,
                     len(ahead.batches))  # fmt: skip
        return []

    def generate_ahead(self) -> None:
        """Generate the next shard's first batches while this one finishes (device thread).

        Stops as soon as a task arrives, when every slot is taken, or when the worker stops.
        """
        deadline = time.monotonic() + 5.0
        while not self.lookahead.ready(timeout=0.02):
            if self._stopping() or self.device.pending() or time.monotonic() > deadline:
                return
        shard = self.lookahead.result()
        # A resolution not measured yet is measured by the task: a hint must not hold the device.
        if shard is None or not self.device.batch_sizes.known(*shard.resolution):
            return
        self._ahead = Ahead(shard, [])
        lo = 0
        while lo < shard.size and len(self._ahead.batches) < self.slots.limit:
            if self._stopping() or self.device.pending():
                return
            self.slots.take()
            try:
                self._ahead.batches.append(self.device.generate_fitting(shard, lo))
            except Exception as e:
                self.slots.free()
                log.debug("generating ahead failed: %s", e)  # the task will generate it again
                return
            lo = self._ahead.batches[-1].rows[1]
