"""The batch size per resolution, and what an out-of-memory error does to it.

A batch that fits at 512×512 may not at 1024×1024, and jobs may override the preset's
size, so the batch size is kept per (width, height):

- **fixed** (``--batch-size N``, the preset's ``batch_size``, the CPU default): N at every
  resolution, never measured;
- **auto** (``--batch-size auto``, the default on CUDA): measured the first time a shard
  asks for a resolution (:func:`worker.speed.auto_batch_size`), on the device thread like
  every model call, then kept for the worker's life.

When a batch runs out of device memory, :meth:`BatchSizes.fit` frees the allocator's
cached memory, halves the size and runs the same rows again, down to 1 (out of memory at 1
fails the attempt). The halved size is kept for that resolution, so later shards start at
a size that fits. Rows and seeds do not depend on the batch size; the bytes may, in the
last bit of some pixels (batched kernels), which is fine: every attempt's metadata
describes the bytes it wrote.

Everything here runs on the device thread (see ``ShardRunner.on_device``): no locking.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("fewstep.worker")

T = TypeVar("T")

Resolution = tuple[int, int]

#: ``FEWSTEP_FAILPOINT=out-of-memory-above:N``: model calls of more than N images raise
#: ``torch.OutOfMemoryError`` as CUDA would (fault tests on machines without a GPU).
OUT_OF_MEMORY_FAILPOINT = "out-of-memory-above"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory (``torch.cuda.OutOfMemoryError``
    is the same class)."""
    import torch

    return isinstance(error, torch.OutOfMemoryError)


def free_cached_memory() -> None:
    """Give the CUDA allocator's cached blocks back after an out-of-memory error, so the
    smaller retry is not refused by fragmentation. Never initialises CUDA."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def out_of_memory_failpoint(images: int) -> None:
    """Raise ``torch.OutOfMemoryError`` for a model call of ``images`` images when the
    :data:`OUT_OF_MEMORY_FAILPOINT` fault point asks for it."""
    name, _, limit = os.environ.get("FEWSTEP_FAILPOINT", "").partition(":")
    if name == OUT_OF_MEMORY_FAILPOINT and images > int(limit):
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (failpoint: a batch of {images} > {limit})")


class BatchSizes:
    """The batch size for each resolution: ``fixed``, or chosen by ``measure(width, height)``."""

    def __init__(self, fixed: int | None = None, measure: Callable[[int, int], int] | None = None):
        if (fixed is None) == (measure is None):
            raise ValueError("a batch size is either fixed or measured")
        self.fixed = fixed
        self._measure = measure
        self._sizes: dict[Resolution, int] = {}  # measured, or lowered after running out of memory

    def __str__(self) -> str:
        return str(self.fixed) if self.fixed is not None else "auto (measured per resolution on first use)"

    def known(self, width: int, height: int) -> bool:
        """Whether :meth:`size` answers without measuring."""
        return self.fixed is not None or (width, height) in self._sizes

    def size(self, width: int, height: int) -> int:
        """The batch size for this resolution, measured on the first call for it (auto)."""
        resolution = (width, height)
        if resolution not in self._sizes:
            if self._measure is None:
                return self.fixed
            self._sizes[resolution] = self._measure(width, height)
        return self._sizes[resolution]

    def fit(self, width: int, height: int, run: Callable[[int], T]) -> tuple[T, int, tuple[int, ...]]:
        """``run(size)`` at this resolution's batch size, halving it after each out-of-memory
        error; returns ``run``'s result, the size it ran at and the sizes that ran out of memory.

        An out-of-memory error at size 1, and any other error, is raised.
        """
        too_large: tuple[int, ...] = ()
        while True:
            size = self.size(width, height)
            try:
                return run(size), size, too_large
            except Exception as e:
                if size == 1 or not is_out_of_memory(e):
                    raise
            # Out of the except block: the traceback's frames, which hold the failed batch's
            # tensors, are gone, so the cached memory can really be given back.
            free_cached_memory()
            self._sizes[(width, height)] = size // 2
            too_large += (size,)
            log.warning(
                "out of memory at batch size %d for %dx%d: retrying these rows at %d, "
                "kept for this resolution",
                size,
                width,
                height,
                size // 2,
            )
