"""Pixels to file bytes: PNG, JPEG or WebP."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def extension(image_format: str) -> str:
    return EXTENSIONS[image_format]


def encode(pixels: np.ndarray, generation: dict[str, Any]) -> bytes:
    """One (H, W, 3) uint8 image in the job's format and settings."""
    image = Image.fromarray(pixels)  # (H, W, 3) uint8 is RGB
    out = io.BytesIO()
    image_format = generation["format"]
    if image_format == "png":
        image.save(out, format="PNG", compress_level=int(generation.get("png_level", 6)))
    elif image_format == "jpeg":
        image.save(out, format="JPEG", quality=int(generation.get("quality", 90)))
    elif image_format == "webp":
        image.save(out, format="WEBP", quality=int(generation.get("quality", 90)))
    else:
        raise ValueError(f"unsupported image format {image_format!r}")
    return out.getvalue()
