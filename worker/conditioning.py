"""Conditioning images: each row's image read, checked, decoded, resized and turned into what
the model sees, on a CPU pool ahead of the device.

::

    manifest row ─▶ read bytes ─▶ sha256 check ─▶ decode ─▶ resize ─▶ control map ─▶ device
    (cond_ref…)     file, s3, ranged,             RGB by     --resize   init | canny |
                    parquet row                   the rules             sketch | as-is

**Reading** (:class:`fewstep.condition_sources.ConditionSources`, by the manifest's
:data:`fewstep.contract.CONDITION_MANIFEST` columns): a local file, an S3 object, a ranged
read of another job's tar, a row of a parquet (the sidecar of bytes the source held, or
another job's parquet layout) read one row group at a time. ``cond_sha256``, when given,
must equal the sha256 of the bytes read.

**Decoding** (one documented rule per case, so a dataset of odd files converts predictably):

- the first frame of an animation (GIF, WebP, APNG);
- EXIF orientation applied (a phone photo stored sideways is turned upright);
- CMYK → RGB by Pillow's conversion (no ICC colour management; Adobe's inverted CMYK JPEGs
  are undone by Pillow's decoder);
- 16-bit and 32-bit integer grey (``I;16``, ``I``) clipped to 0..65535 and scaled by
  255/65535, rounded; float grey (``F``) clipped to 0..255; 16-bit RGB PNGs Pillow already
  reads as 8-bit RGB;
- alpha (RGBA, LA, palette with transparency) composited over **white**: transparent
  product cut-outs and line drawings on transparent paper come out as they look on a page;
- any other mode (1, L, P, YCbCr, HSV, ...) converted to RGB by Pillow;
- an image above ``[conditioning] max_pixels`` is refused before it is decoded, and
  Pillow's decompression-bomb warnings are errors: one clear per-row error either way.

A row that cannot be read or decoded raises :class:`ConditionError`, naming the row and its
source: the shard fails (the attempt record says why), the worker goes on with other shards.

**Resizing** to the job's width × height (``--resize``), Lanczos throughout (with Pillow's
``reducing_gap`` 3, which shrinks huge images by whole factors first: same result for every
run, far faster on a 50 MP photo):

- ``center-crop`` (default): scaled to cover the size, the middle kept;
- ``pad``: scaled to fit inside, centred on **black** (a control map's "nothing here"; white
  paper for a black-on-white sketch); the control map is computed on the image before
  padding, so the pad's border is no edge;
- ``stretch``: scaled to the size, aspect ratio ignored.

**Control maps** (``condition``):

- ``init``: the resized image itself (img2img's starting point);
- ``canny``, ``sketch``: edge maps (:mod:`worker.control_maps`);
- ``as-is``: the resized image is the control map.

All of it runs on the worker's conditioning pool (:class:`ShardConditioning`): rows are
prepared a few batches ahead of the device, started when a shard is opened (read ahead
included), and released once generated, so a shard is never held whole.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fewstep.condition_sources import ConditionSources
from fewstep.settings import defaults, describe_error
from fewstep.storage import KeyMissing, StorageError
from worker.control_maps import canny_map, sketch_map

# A decompression bomb is an error, never a warning in a log nobody reads.
warnings.simplefilter("error", Image.DecompressionBombWarning)

INIT, CANNY, SKETCH, AS_IS = "init", "canny", "sketch", "as-is"
CONTROL_MODES = (SKETCH, CANNY, AS_IS)
RESIZES = ("center-crop", "pad", "stretch")
#: Pillow's ``reducing_gap``: huge images are first shrunk by whole factors (see the module doc).
REDUCING_GAP = 3.0
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


class ConditionError(Exception):
    """A row's conditioning image cannot be used. Retrying reads the same bytes, so the shard
    is marked failed at once (``producer retry JOB --failed`` sends it again after a fix)."""


@dataclass(frozen=True)
class Conditioning:
    """A job's conditioning settings (``spec["conditioning"]``)."""

    condition: str
    resize: str = "center-crop"
    strength: float | None = None
    controlnet_scale: float | None = None
    canny: tuple[int, int] | None = None
    save_control: bool = False
    #: The preset's sketch: stroke polarity ("black-on-white" or "white-on-black") and the
    #: stroke width in pixels at a 512-pixel shorter side.
    sketch: tuple[str, float] = ("black-on-white", 16.0)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Conditioning | None:
        """The settings of a conditioned job; None for a text-only one."""
        cond = spec.get("conditioning")
        if not cond:
            return None
        condition, resize = cond.get("condition"), cond.get("resize") or "center-crop"
        if condition not in (INIT, *CONTROL_MODES):
            raise ConditionError(f"job {spec.get('job')}: unknown condition {condition!r}")
        if resize not in RESIZES:
            raise ConditionError(f"job {spec.get('job')}: unknown resize policy {resize!r}")
        canny = cond.get("canny")
        return cls(
            condition=condition,
            resize=resize,
            strength=None if cond.get("strength") is None else float(cond["strength"]),
            controlnet_scale=None
            if cond.get("controlnet_scale") is None
            else float(cond["controlnet_scale"]),
            canny=(int(canny["low"]), int(canny["high"])) if canny else None,
            save_control=bool(cond.get("save_control")),
        )


# --- decoding, resizing, control maps ---------------------------------------------------------


def decode(data: bytes, max_pixels: int, size: tuple[int, int] | None = None) -> Image.Image:
    """The image's first frame, upright, as RGB, by the rules in the module docstring.

    ``size``: the job's width and height. A JPEG far larger than that is decoded by libjpeg
    at 1/2, 1/4 or 1/8 scale (its DCT scaling, the same every time), never below twice what
    any resize policy or orientation needs (measured: a 4000x3000 JPEG to a 512 px canny map,
    174 ms of CPU without it, 50 ms with it, decoded at half scale).
    """
    image = Image.open(io.BytesIO(data))
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ConditionError(
            f"{image.width}x{image.height} image ({pixels / 1e6:.1f} MP) is above the limit of "
            f"{max_pixels / 1e6:.1f} MP ([conditioning] max_pixels)"
        )
    image.seek(0)  # the first frame of an animation
    if size is not None and image.format == "JPEG":
        scale = 2 * max(size) / min(image.size)  # enough for cover, fit and stretch, either way up
        if scale < 1:
            image.draft(None, (round(image.width * scale), round(image.height * scale)))
    image.load()
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB by the conversion rules: high-bit-depth grey scaled, alpha composited over white."""
    mode = image.mode
    if mode.startswith("I"):
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def resize(
    image: Image.Image, width: int, height: int, policy: str
) -> tuple[Image.Image, tuple[int, int] | None]:
    """The image at the job's size by ``policy``; for ``pad``, the image fitted inside and the
    offset it goes at on the black canvas (:func:`place`), else None."""
    iw, ih = image.size
    if policy == "stretch":
        return image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP), None
    if policy == "pad":
        scale = min(width / iw, height / ih)
        size = (max(1, min(width, round(iw * scale))), max(1, min(height, round(ih * scale))))
        inner = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
        return inner, ((width - size[0]) // 2, (height - size[1]) // 2)
    scale = max(width / iw, height / ih)  # center-crop: cover the size, keep the middle
    cw, ch = width / scale, height / scale
    left, top = (iw - cw) / 2, (ih - ch) / 2
    box = (left, top, left + cw, top + ch)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP), None


def place(
    image: Image.Image, width: int, height: int, offset: tuple[int, int] | None, background=BLACK
) -> Image.Image:
    """``image`` on a ``background`` (black) ``width`` × ``height`` canvas at ``offset``
    (``pad``); as is otherwise."""
    if offset is None:
        return image
    canvas = Image.new("RGB", (width, height), background)
    canvas.paste(image, offset)
    return canvas


def control_map(image: Image.Image, settings: Conditioning, side: int | None = None) -> Image.Image:
    """What the model is given for a resized image: the image (init, as-is) or its edges
    (``side``: the shorter side of the job's canvas, which sets a sketch's stroke width)."""
    if settings.condition == CANNY:
        low, high = settings.canny or (100, 200)
        return canny_map(image, low, high)
    if settings.condition == SKETCH:
        cfg = defaults()["conditioning"]
        strokes, width = settings.sketch
        return sketch_map(image, int(cfg["sketch_low"]), int(cfg["sketch_high"]), strokes, width, side)
    return image


def pad_colour(settings: Conditioning) -> tuple[int, int, int]:
    """What a ``pad`` border is: the sketch's paper, else black (no edge, no image)."""
    if settings.condition == SKETCH and settings.sketch[0] == "black-on-white":
        return WHITE
    return BLACK


def encode_png(image: Image.Image, level: int) -> bytes:
    """A control map as PNG: lossless, so a user sees exactly what the model saw."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=level)
    return out.getvalue()


# --- one shard's rows, prepared ahead ----------------------------------------------------------


@dataclass
class Prepared:
    """One row ready for the device: the image the model is given and the bytes' digest."""

    image: Image.Image
    sha256: str
    control_png: bytes | None = None


class ShardConditioning:
    """A shard's conditioning inputs, prepared on ``pool`` a bounded window of rows ahead.

    :meth:`start` (when the shard is opened, read-ahead included) submits the first ``window``
    rows; :meth:`batch` (device thread) waits for a batch's rows and keeps the window ahead of
    it; :meth:`release` drops a generated batch's images. Saved control maps wait in
    :meth:`take_control` for the writer. ``sha256`` is filled row by row (metadata).
    """

    def __init__(
        self,
        settings: Conditioning,
        rows: dict[str, list],
        sources: ConditionSources,
        pool: ThreadPoolExecutor,
        size: tuple[int, int],
        window: int,
    ):
        self.settings = settings
        self.rows = rows
        self.sources = sources
        self.pool = pool
        self.width, self.height = size
        self.window = max(1, window)
        self.batches_ahead = int(defaults()["conditioning"]["batches_ahead"])
        self.n = len(rows["row_id"])
        self.sha256: list[str | None] = [None] * self.n
        self._futures: dict[int, Future] = {}
        self._controls: dict[int, bytes] = {}
        self._submitted = 0
        self._closed = False
        self._lock = threading.Lock()
        cfg = defaults()["conditioning"]
        self.max_pixels = int(cfg["max_pixels"])
        self.png_level = int(cfg["control_png_level"])

    def start(self) -> None:
        """Begin preparing the first rows."""
        self._submit_until(self.window)

    def _submit_until(self, end: int) -> None:
        with self._lock:
            while not self._closed and self._submitted < min(end, self.n):
                i = self._submitted
                self._futures[i] = self.pool.submit(self._prepare, i)
                self._submitted += 1

    def batch(self, lo: int, hi: int) -> list[Prepared]:
        """The rows [lo, hi), waiting for them; :class:`ConditionError` for a row that fails."""
        self._submit_until(hi)
        with self._lock:
            futures = [self._futures.get(i) for i in range(lo, hi)]
        if any(f is None for f in futures):
            raise RuntimeError(f"conditioning rows {lo}..{hi} were released or never prepared")
        try:
            prepared = [f.result() for f in futures]
        except CancelledError:
            raise RuntimeError("conditioning was stopped") from None
        # A few batches of the size the device asks for (measured batch sizes become known late).
        self._submit_until(hi + max(self.window, self.batches_ahead * (hi - lo)))
        return prepared

    def release(self, lo: int, hi: int) -> None:
        """The rows [lo, hi) are generated: their images are no longer needed."""
        with self._lock:
            for i in range(lo, hi):
                self._futures.pop(i, None)

    def take_control(self, index: int) -> bytes | None:
        """Row ``index``'s control map PNG (``save_control``), handed over once, to the writer."""
        with self._lock:
            return self._controls.pop(index, None)

    def close(self) -> None:
        """Stop preparing (the shard ended, failed, or went to another worker)."""
        with self._lock:
            self._closed = True
            for future in self._futures.values():
                future.cancel()
            self._futures.clear()
            self._controls.clear()

    def source(self, index: int) -> str:
        """What row ``index`` named, for errors (the metadata's ``cond_key``)."""
        return self.rows["cond_source"][index] or self.rows["cond_ref"][index]

    def _where(self, index: int) -> str:
        """What row ``index`` named and, when that differs (a relative path), where it was looked for."""
        named, ref = self.rows["cond_source"][index], self.rows["cond_ref"][index]
        place = ref.removeprefix("file://") if ref else None
        if named and place and named.removeprefix("file://") != place:
            return f"{named}, looked for at {place}"
        return named or place or "(no image named)"

    def _prepare(self, index: int) -> Prepared:
        row = {k: v[index] for k, v in self.rows.items() if k.startswith("cond_")}
        where = f"row {self.rows['row_id'][index]} ({self._where(index)})"
        try:
            data = self.sources.read(row)
        except KeyMissing:
            raise ConditionError(f"{where}: conditioning image not found") from None
        except StorageError:
            raise  # storage down: the shard is tried again later, like any storage outage
        except (OSError, ValueError) as e:
            raise ConditionError(
                f"{where}: cannot read the conditioning image: {describe_error(e, 300)}"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        expected = row.get("cond_sha256")
        if expected and expected != digest:
            raise ConditionError(
                f"{where}: conditioning image has sha256 {digest}, the manifest expects {expected}"
            )
        self.sha256[index] = digest
        try:
            image = decode(data, self.max_pixels, (self.width, self.height))
        except ConditionError as e:
            raise ConditionError(f"{where}: {e}") from None
        except UnidentifiedImageError:
            raise ConditionError(f"{where}: not an image in a format Pillow reads") from None
        except Exception as e:  # Pillow raises many kinds on damaged files
            raise ConditionError(
                f"{where}: cannot decode the conditioning image: {describe_error(e, 300)}"
            ) from None
        fitted, offset = resize(image, self.width, self.height, self.settings.resize)
        drawn = control_map(fitted, self.settings, min(self.width, self.height))
        given = place(drawn, self.width, self.height, offset, pad_colour(self.settings))
        prepared = Prepared(given, digest)
        if self.settings.save_control:
            png = encode_png(given, self.png_level)
            with self._lock:
                if not self._closed:
                    self._controls[index] = png
        return prepared


# --- a shard's conditioning, from the job spec to the device ----------------------------------


def open_conditioning(
    spec: dict[str, Any],
    model: str,
    preset: dict[str, Any],
    rows: dict[str, list],
    sources: ConditionSources,
    pool: ThreadPoolExecutor,
    size: tuple[int, int],
    batch: int,
) -> ShardConditioning | None:
    """Start preparing a conditioned shard's images on ``pool`` (read-ahead included): a few
    batches of ``batch`` rows ahead, never the whole shard. None for a text-only job; a job
    the model (``model``, ``preset``) cannot run is refused with a :class:`ConditionError`."""
    settings = Conditioning.from_spec(spec)
    if settings is None:
        if preset.get("control"):
            raise ConditionError(
                f"job {spec['job']} is text-only; model {model} is a ControlNet "
                "preset and needs a conditioning image per row"
            )
        return None
    if settings.condition == INIT and not preset.get("img2img"):
        raise ConditionError(f"job {spec['job']}: model {model} has no img2img pipeline")
    modes = (preset.get("control") or {}).get("modes", ())
    if settings.condition != INIT and settings.condition not in modes:
        raise ConditionError(f"job {spec['job']}: model {model} takes no {settings.condition} control maps")
    # What runs when the spec leaves it to the preset: recorded as run.
    if settings.condition == INIT and settings.strength is None:
        settings = replace(settings, strength=float(preset["img2img"]["strength"]))
    if settings.condition != INIT and settings.controlnet_scale is None:
        settings = replace(settings, controlnet_scale=float(preset["control"].get("scale", 1.0)))
    sketch = (preset.get("control") or {}).get("sketch")
    if sketch:  # the polarity and stroke width the preset's ControlNet is fed
        if sketch.get("strokes") not in ("black-on-white", "white-on-black"):
            raise ConditionError(
                f"model {model}: control.sketch.strokes must be black-on-white or white-on-black"
            )
        settings = replace(settings, sketch=(str(sketch["strokes"]), float(sketch["stroke_width"])))
    window = int(defaults()["conditioning"]["batches_ahead"]) * batch
    conditioning = ShardConditioning(settings, rows, sources, pool, size, window)
    conditioning.start()
    return conditioning


def conditioning_inputs(conditioning: ShardConditioning | None, lo: int, hi: int) -> dict[str, Any]:
    """The batch's conditioning arguments for :meth:`Model.generate` (device thread; waits
    for the pool): init images and strength, or control maps and their scale."""
    if conditioning is None:
        return {}
    settings = conditioning.settings
    images = [p.image for p in conditioning.batch(lo, hi)]
    if settings.condition == INIT:
        return {"images": images, "strength": settings.strength}
    return {"control_images": images, "controlnet_scale": settings.controlnet_scale}


def condition_columns(conditioning: ShardConditioning) -> dict[str, list]:
    """The conditioning metadata of a shard's rows; ``cond_sha256`` fills in as the pool reads
    each row's bytes (the very list), the control map columns come from the writer."""
    settings, n = conditioning.settings, conditioning.n
    return {
        "cond_key": [conditioning.source(i) for i in range(n)],
        "cond_sha256": conditioning.sha256,
        "condition": [settings.condition] * n,
        "strength": [settings.strength] * n,
        "controlnet_scale": [settings.controlnet_scale] * n,
        "resize": [settings.resize] * n,
    }
