"""The encode stage: pixels to file bytes (PNG, JPEG or WebP) with the job's settings.

On the CPU, Pillow compresses with the GIL released, so a pool of threads sized to the
host's cores encodes in parallel (``bench/pipeline.py`` measures threads against
processes). On CUDA, JPEG can be encoded by nvJPEG through ``torchvision.io.encode_jpeg``
when torchvision is installed: the pixels never leave the GPU, only the compressed bytes
do. Otherwise a batch produced on the GPU is copied to pinned host memory on a side
stream (:func:`to_host`), so the copy of batch k overlaps the generation of batch k+1.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL
from PIL import Image

from fewstep import UserError
from fewstep.contract import IMAGE_EXTENSIONS

JPEG_ENCODERS = ("auto", "gpu", "cpu")


@dataclass(frozen=True)
class ImageFormat:
    """A job's image format and its settings (``generation`` block of job.json)."""

    name: str
    quality: int | None = None  # JPEG and WebP
    png_level: int | None = None  # PNG

    @classmethod
    def from_generation(cls, generation: dict[str, Any]) -> ImageFormat:
        """The format a job spec asks for; settings it leaves out take Pillow-era defaults."""
        name = generation["format"]
        if name not in IMAGE_EXTENSIONS:
            raise UserError(f"unsupported image format {name!r}: use png, jpeg or webp")
        if name == "png":
            return cls(name, png_level=int(generation.get("png_level", 6)))
        return cls(name, quality=int(generation.get("quality", 90)))

    @property
    def extension(self) -> str:
        """The file extension (``jpg`` for JPEG)."""
        return IMAGE_EXTENSIONS[self.name]


PILLOW = f"pillow-{PIL.__version__}"


def encode(pixels: np.ndarray, image_format: ImageFormat) -> bytes:
    """One (H, W, 3) uint8 RGB image as file bytes, on the CPU with Pillow."""
    image = Image.fromarray(pixels)
    out = io.BytesIO()
    if image_format.name == "png":
        image.save(out, format="PNG", compress_level=image_format.png_level)
    elif image_format.name == "jpeg":
        image.save(out, format="JPEG", quality=image_format.quality)
    else:
        image.save(out, format="WEBP", quality=image_format.quality)
    return out.getvalue()


def gpu_jpeg_label() -> str | None:
    """``nvjpeg-torchvision-X`` when torchvision can encode JPEG on CUDA tensors, else None."""
    try:
        import torchvision
        from torchvision.io import encode_jpeg  # noqa: F401
    except ImportError:
        return None
    major, minor = (int(p) for p in torchvision.__version__.split(".")[:2])
    # Batched encode_jpeg on CUDA tensors arrived in torchvision 0.19.
    return f"nvjpeg-torchvision-{torchvision.__version__}" if (major, minor) >= (0, 19) else None


def choose_jpeg_encoder(choice: str, device: str) -> str | None:
    """The GPU JPEG encoder's label when JPEG should be encoded on the GPU, else None (CPU).

    ``auto`` uses nvJPEG on CUDA when torchvision supports it; ``gpu`` insists on it;
    ``cpu`` never uses it.
    """
    if choice not in JPEG_ENCODERS:
        raise UserError(f"unknown JPEG encoder {choice!r}: use {', '.join(JPEG_ENCODERS)}")
    if choice == "cpu":
        return None
    label = gpu_jpeg_label() if device.startswith("cuda") else None
    if choice == "gpu" and label is None:
        raise UserError(
            "--jpeg-encoder gpu needs a CUDA device and torchvision>=0.19 "
            "(pip install the torchvision build matching your torch)"
        )
    return label


def encode_jpeg_on_device(images, quality: int) -> list[bytes]:
    """JPEG bytes of a (N, H, W, 3) uint8 CUDA tensor, encoded by nvJPEG; only the bytes cross to the host."""
    import torch
    from torchvision.io import encode_jpeg

    encoded = encode_jpeg(list(images.permute(0, 3, 1, 2).contiguous().unbind(0)), quality=quality)
    flat = torch.cat(encoded).cpu().numpy()  # one copy to the host for the whole batch
    ends = np.cumsum([data.numel() for data in encoded])
    return [flat[end - data.numel() : end].tobytes() for data, end in zip(encoded, ends, strict=True)]


class HostPixels:
    """A batch's pixels on the host; on CUDA the copy runs on a side stream until :meth:`array`."""

    def __init__(self, array: np.ndarray | None = None, *, tensor=None, event=None):
        self._array = array
        self._tensor = tensor
        self._event = event
        self._lock = threading.Lock()  # the batch's encode threads all ask at once

    def array(self) -> np.ndarray:
        """The (N, H, W, 3) uint8 pixels, waiting for the device copy if one is running."""
        with self._lock:
            if self._array is None:
                self._event.synchronize()
                self._array = self._tensor.numpy()
                self._tensor = self._event = None
            return self._array


def to_host(images) -> HostPixels:
    """Start moving a batch to the host: numpy stays as is, a CUDA tensor copies asynchronously."""
    if isinstance(images, np.ndarray):
        return HostPixels(images)
    import torch

    if images.device.type != "cuda":
        return HostPixels(images.numpy())
    copy_stream = _copy_stream(images.device)
    copy_stream.wait_stream(torch.cuda.current_stream(images.device))
    with torch.cuda.stream(copy_stream):
        host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
        host.copy_(images, non_blocking=True)
        images.record_stream(copy_stream)  # keep the device memory alive until the copy is done
        event = torch.cuda.Event()
        event.record(copy_stream)
    return HostPixels(tensor=host, event=event)


_COPY_STREAMS: dict[Any, Any] = {}


def _copy_stream(device):
    import torch

    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]
