"""The one thread that owns the model: every call of the pipeline, a batch fitted to memory.

Every model call (batches, warm-up and batch-size probes included) runs on this thread, since
CUDA graphs and compile caches are per thread and the pipeline's tokenizer and scheduler are
state no second thread may touch. Other threads hand it work (:meth:`DeviceThread.call`,
:meth:`DeviceThread.submit`) and never call the model themselves.
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from worker.batching import BatchSizes
from worker.conditioning import conditioning_inputs
from worker.loaded_model import Batch, Model
from worker.rows import OpenShard
from worker.scoring import BatchScores, Scoring
from worker.shard_stats import now


@dataclass
class Generated:
    """A generated batch: the images, when the device ran it, when it was made, with which sampler."""

    batch: Batch
    busy: tuple[float, float]
    started: dt.datetime
    created: dt.datetime
    sampler: str
    rows: tuple[int, int] = (0, 0)  # the shard's rows [lo, hi) it holds
    batch_size: int = 0  # the batch size it ran at (its rows, but for a shard's last batch)
    too_large: tuple[int, ...] = ()  # batch sizes that ran out of memory before it fitted
    scores: BatchScores | None = None  # the job's scores and embeddings of its images (--score)
    #: Best-of-K: the stored rows' candidate columns (worker.candidates); None without candidates.
    candidates: dict[str, list] | None = None
    generated: int = 0  # images the model made for it (K per row with --candidates K --keep best)
    #: Device time of the batch: ``busy`` plus the out-of-memory tries before it fitted.
    device_s: float = 0.0


class DeviceThread:
    """The model's own thread, and the batches it generates (with their scores)."""

    def __init__(self, model: Model, batch_sizes: BatchSizes):
        self.model = model
        # Per resolution; see worker.batching.
        self.batch_sizes = batch_sizes
        self.scoring = Scoring(model.device, model.dtype)  # scorer models, loaded by this thread
        self._calls: queue.Queue = queue.Queue()
        self._busy: deque[tuple[float, float]] = deque()  # device busy intervals (perf_counter)
        self._running_since: float | None = None  # start of the batch on the device now
        self._busy_lock = threading.Lock()
        self._keep_on_device = model.device.startswith("cuda")
        self._thread = threading.Thread(target=self._loop, name="generate", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the device thread and return its result."""
        future: Future = Future()
        self._calls.put((fn, args, future))
        return future.result()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` on the device thread without waiting for it."""
        self._calls.put((fn, args, Future()))

    def pending(self) -> bool:
        """Whether work waits for the device: what it does on its own (read-ahead) must yield."""
        return not self._calls.empty()

    def _loop(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            fn, args, future = item
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)

    def generate(self, shard: OpenShard, lo: int, hi: int) -> Generated:
        """The shard's rows [lo, hi) generated and scored as one batch (device thread)."""
        gen = shard.spec["generation"]
        # The job's sampler, switched here on the device thread: batches generated ahead for
        # the next shard may belong to a job with another sampler.
        self.model.use_sampler(gen.get("sampler"))
        conditioning = conditioning_inputs(shard.conditioning, lo, hi)  # waits for the CPU pool's maps
        prompts, seeds = shard.rows["prompt"][lo:hi], shard.rows["seed"][lo:hi]
        cands = shard.candidates
        if cands is not None:  # best-of-K: K images a row, in one call
            prompts, seeds = cands.inputs(prompts, seeds)
            conditioning = {k: cands.repeat(v) if isinstance(v, list) else v for k, v in conditioning.items()}
        started = now()
        start = self._running_since = time.perf_counter()
        batch = self.model.generate(
            prompts,
            seeds,
            steps=gen["steps"],
            guidance=gen["guidance"],
            width=gen["width"],
            height=gen["height"],
            keep_on_device=self._keep_on_device,
            **conditioning,
        )
        if shard.conditioning is not None:
            shard.conditioning.release(lo, hi)
        # Scored here, from the decoded images still on the device, so batches generated ahead
        # for the next shard carry their scores too.
        scores = self.scoring.score(shard.spec.get("scoring"), batch.images, prompts)
        generated, chosen = len(seeds), None
        if cands is not None:  # keep each row's best candidate (or all, ranked), on the device
            batch, scores, chosen = cands.keep(batch, scores, seeds)
        busy = (start, time.perf_counter())
        with self._busy_lock:
            self._busy.append(busy)
            self._running_since = None
        return Generated(
            batch, busy, started, now(), self.model.sampler, (lo, hi), scores=scores, candidates=chosen,
            generated=generated,
        )  # fmt: skip

    def generate_fitting(self, shard: OpenShard, lo: int) -> Generated:
        """The batch from row ``lo`` at the batch size for the shard's resolution, halved
        after each out-of-memory error (device thread; see :meth:`BatchSizes.fit`)."""
        cands = shard.candidates  # a batch size counts images: K of them a prompt

        def rows(size: int) -> int:
            return cands.batch_rows(size) if cands is not None else size

        failed = 0.0  # device time of the tries that ran out of memory

        def attempt(size: int) -> Generated:
            nonlocal failed
            begun = time.perf_counter()
            try:
                return self.generate(shard, lo, min(lo + rows(size), shard.size))
            except BaseException:
                failed += time.perf_counter() - begun
                raise

        generated, size, too_large = self.batch_sizes.fit(*shard.resolution, attempt)
        device_s = generated.busy[1] - generated.busy[0] + failed
        return replace(generated, batch_size=size, too_large=too_large, device_s=device_s)

    def idle_seconds(self, start: float, end: float) -> float:
        """Time in [start, end] in which the device ran no batch (of any shard)."""
        with self._busy_lock:
            while self._busy and self._busy[0][1] < start:
                self._busy.popleft()
            running = [(self._running_since, end)] if self._running_since is not None else []
            busy = sum(max(0.0, min(b, end) - max(a, start)) for a, b in [*self._busy, *running])
        return max(0.0, (end - start) - busy)

    def close(self) -> None:
        """Stop the thread once the call it runs returns: the interpreter never exits under a
        running model call (which aborts the process)."""
        self._calls.put(None)
        self._thread.join(timeout=30)
