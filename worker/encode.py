"""The encode stage: pixels to file bytes (PNG, JPEG, WebP or JPEG XL) with the job's settings.

PNG is written by fpng by default (about 1 ms per 512x512 image, 50-90x faster than Pillow's
zlib at level 6 for 1.1-1.15x the bytes; measured in ``bench/encoders.py``, see
docs/BENCHMARKS.md), or by Pillow at a chosen ``png_level``; both are standard PNGs that
every reader decodes to the same pixels. JPEG XL (lossless unless a quality is given) is
written by libjxl through ``imagecodecs``. On the CPU, Pillow and imagecodecs compress with
the GIL released, so a pool of threads sized to the host's cores encodes in parallel
(``bench/pipeline.py`` measures threads against processes); fpng holds it for its
millisecond. On CUDA, JPEG can be encoded by nvJPEG through ``torchvision.io.encode_jpeg``
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

import fewstep.jpegxl  # noqa: F401  (Pillow reads JPEG XL: conditioning on a jxl job's images)
from fewstep import UserError
from fewstep.contract import IMAGE_EXTENSIONS

JPEG_ENCODERS = ("auto", "gpu", "cpu")
PNG_ENCODERS = ("fpng", "pillow")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageFormat:
    """A job's image format and its settings (``generation`` block of job.json)."""

    name: str
    quality: int | None = None  # JPEG and WebP; JPEG XL when lossy (None: lossless)
    png_level: int | None = None  # PNG written by Pillow
    png_encoder: str | None = None  # PNG: fpng or pillow
    effort: int | None = None  # JPEG XL

    @classmethod
    def from_generation(cls, generation: dict[str, Any]) -> ImageFormat:
        """The format a job spec asks for; settings it leaves out take the defaults of the
        job specs written before them (Pillow PNG at level 6, quality 90)."""
        name = generation["format"]
        if name not in IMAGE_EXTENSIONS:
            raise UserError(f"unsupported image format {name!r}: use {', '.join(IMAGE_EXTENSIONS)}")
        if name == "png":
            encoder = generation.get("png_encoder", "pillow")
            if encoder not in PNG_ENCODERS:
                raise UserError(f"unknown PNG encoder {encoder!r}: use {', '.join(PNG_ENCODERS)}")
            level = int(generation.get("png_level", 6)) if encoder == "pillow" else None
            return cls(name, png_level=level, png_encoder=encoder)
        if name == "jxl":
            quality = generation.get("quality")
            return cls(name, quality=None if quality is None else int(quality),
                       effort=int(generation.get("effort", 1)))  # fmt: skip
        return cls(name, quality=int(generation.get("quality", 90)))

    @property
    def extension(self) -> str:
        """The file extension (``jpg`` for JPEG)."""
        return IMAGE_EXTENSIONS[self.name]


PILLOW = f"pillow-{PIL.__version__}"


def encoder_label(image_format: ImageFormat) -> str:
    """The CPU encoder of ``image_format`` and its version, as recorded per row and in stats."""
    if image_format.name == "png" and image_format.png_encoder == "fpng":
        return f"fpng-{_fpng().__version__}"
    if image_format.name == "jxl":
        codecs = _imagecodecs()
        return f"imagecodecs-{codecs.__version__} {codecs.jpegxl_version().replace(' ', '-')}"
    return PILLOW


def check_encoder(image_format: ImageFormat) -> None:
    """Refuse, in one line, a format whose encoder is not installed on this worker."""
    encoder_label(image_format)


def encode(pixels: np.ndarray, image_format: ImageFormat) -> bytes:
    """One (H, W, 3) uint8 RGB image as file bytes, on the CPU."""
    if image_format.name == "png" and image_format.png_encoder == "fpng":
        data = _fpng().from_ndarray(np.ascontiguousarray(pixels))
        if not data.startswith(PNG_SIGNATURE):  # the binding returns what it has when fpng fails
            raise RuntimeError(f"fpng could not encode a {pixels.shape} {pixels.dtype} image")
        return data
    if image_format.name == "jxl":
        lossless = image_format.quality is None
        return _imagecodecs().jpegxl_encode(
            np.ascontiguousarray(pixels), level=image_format.quality, lossless=lossless,
            effort=image_format.effort, numthreads=1,  # one image a thread: the pool is the parallelism
        )  # fmt: skip
    image = Image.fromarray(pixels)
    out = io.BytesIO()
    if image_format.name == "png":
        image.save(out, format="PNG", compress_level=image_format.png_level)
    elif image_format.name == "jpeg":
        image.save(out, format="JPEG", quality=image_format.quality)
    else:
        image.save(out, format="WEBP", quality=image_format.quality)
    return out.getvalue()


def _fpng():
    try:
        import fpng
    except ImportError:
        raise UserError("PNG with --png-encoder fpng needs the fpng package: pip install fpng") from None
    return fpng


def _imagecodecs():
    try:
        import imagecodecs
    except ImportError:
        raise UserError("JPEG XL needs the imagecodecs package: pip install imagecodecs") from None
    return imagecodecs


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
