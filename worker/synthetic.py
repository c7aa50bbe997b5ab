"""The ``synthetic`` preset: a stand-in for a GPU model, for benchmarks only.

It behaves like a model on an accelerator: each batch takes a fixed wall time, spent with
the GIL released (as while a CUDA kernel runs), and yields fixed-size images. The images
compress like pictures, not like flat colour (smooth colour fields with fine grain:
JPEG q90 ~60 KB, PNG ~400 KB at 512x512), so the encode and upload stages downstream
do realistic work. Image i depends only on its seed, as with a real model.

The latency per batch comes from the preset's ``batch_ms``; benchmarks override it with
``FEWSTEP_SYNTHETIC_BATCH_MS``. The rate is then ``batch size / latency``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from worker.loaded_model import Batch, Model

LATENCY_ENV = "FEWSTEP_SYNTHETIC_BATCH_MS"
DISTINCT_IMAGES = 16


@cache
def _picture(index: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width, 3), 128.0, np.float32)
    for channel in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 6, 2) * 2 * np.pi / np.array([width, height])
            image[..., channel] += rng.uniform(20, 50) * np.sin(fx * x + fy * y + rng.uniform(0, 2 * np.pi))
    image += rng.normal(0, 4, (height, width, 1)) + rng.normal(0, 2, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def pictures(width: int, height: int) -> np.ndarray:
    """The (DISTINCT_IMAGES, H, W, 3) images the synthetic model cycles through."""
    return np.stack([_picture(i, width, height) for i in range(DISTINCT_IMAGES)])


@dataclass
class SyntheticModel(Model):
    """Fixed latency per batch with the GIL released; images chosen by seed. No tokenizer:
    ``count_tokens`` gives zero tokens and no limit."""

    batch_seconds: float = 0.0
    _pictures: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int,
        guidance: float,
        width: int,
        height: int,
        keep_on_device: bool = False,
    ) -> Batch:
        """A batch of ``len(prompts)`` images after exactly ``batch_seconds`` (at least)."""
        start = time.perf_counter()
        if (width, height) not in self._pictures:
            self._pictures[(width, height)] = pictures(width, height)
        images = self._pictures[(width, height)][np.asarray(seeds, dtype=np.int64) % DISTINCT_IMAGES]
        remaining = self.batch_seconds - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)  # releases the GIL, as a device kernel would
        return Batch(images=images, nsfw=[None] * len(prompts), seconds=time.perf_counter() - start)


def load(name: str, preset: dict[str, Any], device: str) -> SyntheticModel:
    """The synthetic model with the preset's (or the environment's) latency per batch."""
    millis = float(os.environ.get(LATENCY_ENV) or preset.get("batch_ms", 50))
    model = SyntheticModel(
        name=name,
        preset=preset,
        pipeline=None,
        device=device,
        dtype=preset.get("dtype", "float32"),
        revision=preset.get("revision"),
        sampler=preset.get("sampler") or "synthetic",
        batch_seconds=millis / 1000,
    )
    model._pictures[(preset["width"], preset["height"])] = pictures(preset["width"], preset["height"])
    return model
