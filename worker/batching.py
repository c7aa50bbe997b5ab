"""The batch size per resolution, and what an out-of-memory error does to it.

A batch that fits at 512×512 may not at 1024×1024, and jobs may override the preset's
size, so the batch size is kept per (width, height):

- **fixed** (``--batch-size N``, the preset's ``batch_size``, the CPU default): N at every
  resolution, never measured;
- **auto** (``--batch-size auto``, the default on CUDA): measured the first time a shard
  asks for a resolution (:func:`worker.speed.auto_batch_size`), on the device thread like
  every model call, then kept for the worker's life.

When a batch is too large for the device (:func:`is_batch_too_large`: out of memory, or a
kernel's 32-bit index limit: the SD VAE's decoder activations pass 2**31 elements from a
batch of 32 at 512x512), :meth:`BatchSizes.fit` frees the allocator's cached memory, halves the
size and runs the same rows again, down to 1 (too large at 1 fails the attempt). The halved
size is kept for that resolution, so later shards start at a size that fits. Rows and seeds
do not depend on the batch size; the bytes may, in the last bit of some pixels (batched
kernels), which is fine: every attempt's metadata describes the bytes it wrote.

Everything here runs on the device thread (see ``ShardRunner.on_device``): no locking.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("fewstep.worker")

T = TypeVar("T")

Resolution = tuple[int, int]

#: ``FEWSTEP_FAILPOINT=out-of-memory-above:N``: model calls of more than N images raise
#: ``torch.OutOfMemoryError`` as CUDA would (fault tests on machines without a GPU).
OUT_OF_MEMORY_FAILPOINT = "out-of-memory-above"
#: ``FEWSTEP_FAILPOINT=index-limit-above:N``: model calls of more than N images raise the
#: ``RuntimeError`` a CUDA kernel raises past its 32-bit index limit.
INDEX_LIMIT_FAILPOINT = "index-limit-above"
INDEX_LIMIT_MESSAGE = (
    "upsample_nearest_nhwc only supports output tensors with less than INT_MAX elements, but got {}"
)
#: ``RuntimeError`` messages of PyTorch's CUDA kernels (read from libtorch_cuda 2.11) and of
#: cuDNN/cuBLAS that mean "this batch is too large", not "this process is broken": a smaller
#: batch runs. Sticky CUDA errors (an illegal memory access) are not among them: after one,
#: no retry in this process can succeed.
TOO_LARGE = re.compile(
    r"INT_MAX|canUse32BitIndexMath|32-bit index math|tensor is too large|size is too large"
    r"|too large to fit into a int|invalid configuration argument"
    r"|CUDNN_STATUS_NOT_SUPPORTED|CUDNN_STATUS_ALLOC_FAILED|CUBLAS_STATUS_ALLOC_FAILED"
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory (``torch.cuda.OutOfMemoryError``
    is the same class)."""
    import torch

    return isinstance(error, torch.OutOfMemoryError)


def is_batch_too_large(error: BaseException) -> bool:
    """Whether a smaller batch may succeed where this one raised ``error``: out of memory, or
    a ``RuntimeError`` saying a tensor passed a kernel's size limit (:data:`TOO_LARGE`)."""
    return is_out_of_memory(error) or (isinstance(error, RuntimeError) and bool(TOO_LARGE.search(str(error))))


def free_cached_memory() -> None:
    """Give the CUDA allocator's cached blocks back after an out-of-memory error, so the
    smaller retry is not refused by fragmentation. Never initialises CUDA."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def out_of_memory_failpoint(images: int) -> None:
    """Raise ``torch.OutOfMemoryError`` (:data:`OUT_OF_MEMORY_FAILPOINT`) or the index-limit
    ``RuntimeError`` (:data:`INDEX_LIMIT_FAILPOINT`) for a model call of ``images`` images when
    the fault point asks for it."""
    name, _, limit = os.environ.get("FEWSTEP_FAILPOINT", "").partition(":")
    if name == OUT_OF_MEMORY_FAILPOINT and images > int(limit):
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (failpoint: a batch of {images} > {limit})")
    if name == INDEX_LIMIT_FAILPOINT and images > int(limit):
        raise RuntimeError(INDEX_LIMIT_MESSAGE.format(f"[{images}, 256, 512, 512] (failpoint)"))


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
        """``run(size)`` at this resolution's batch size, halving it after each error that says
        the batch is too large (:func:`is_batch_too_large`); returns ``run``'s result, the size it
        ran at and the sizes that were too large.

        Such an error at size 1, and any other error, is raised.
        """
        too_large: tuple[int, ...] = ()
        while True:
            size = self.size(width, height)
            try:
                return run(size), size, too_large
            except Exception as e:
                if size == 1 or not is_batch_too_large(e):
                    raise
                reason = "out of memory" if is_out_of_memory(e) else "too large for a kernel"
            # Out of the except block: the traceback's frames, which hold the failed batch's
            # tensors, are gone, so the cached memory can really be given back.
            free_cached_memory()
            self._sizes[(width, height)] = size // 2
            too_large += (size,)
            log.warning(
                "%s at batch size %d for %dx%d: retrying these rows at %d, kept for this resolution",
                reason,
                size,
                width,
                height,
                size // 2,
            )
