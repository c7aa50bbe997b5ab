"""JPEG XL read through Pillow: ``Image.open`` on a ``.jxl`` decodes it with ``imagecodecs`` (libjxl).

Pillow has no JPEG XL support of its own. Importing this module registers a read-only plugin,
so every place that opens images with Pillow (verify, gallery, report, a chained job's
conditioning) reads a ``--format jxl`` job's images as it reads PNGs. The size comes from the
codestream's header before anything is decoded, so Pillow's decompression-bomb check (and the
worker's ``max_pixels``) runs before libjxl allocates the pixels.
"""

from __future__ import annotations

from PIL import Image, ImageFile

CODESTREAM = b"\xff\x0a"
CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


def is_jpegxl(head: bytes) -> bool:
    """Whether ``head`` starts like a JPEG XL file (bare codestream or ISO BMFF container)."""
    return head.startswith(CODESTREAM) or head.startswith(CONTAINER)


def _codestream(data: bytes) -> bytes:
    """The codestream's first bytes: ``data`` itself, or the first ``jxlc``/``jxlp`` box's payload."""
    if data.startswith(CODESTREAM):
        return data
    at = 0
    while at + 8 <= len(data):
        size, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8]
        header = 8
        if size == 1:
            size, header = int.from_bytes(data[at + 8 : at + 16], "big"), 16
        if kind == b"jxlc":
            return data[at + header :]
        if kind == b"jxlp":
            return data[at + header + 4 :]  # after the part's index
        if size < header:  # 0: the box runs to the end of the file
            break
        at += size
    raise SyntaxError("no JPEG XL codestream box")


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG XL file's SizeHeader (spec 18181-1, D.2); bits LSB first."""
    stream = _codestream(data)
    if not stream.startswith(CODESTREAM) or len(stream) < 11:
        raise SyntaxError("not a JPEG XL codestream")
    bits = int.from_bytes(stream[2:11], "little")
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        value = (bits >> pos) & ((1 << n) - 1)
        pos += n
        return value

    def u32() -> int:
        return read((9, 13, 18, 30)[read(2)]) + 1

    small = read(1)
    height = 8 * (read(5) + 1) if small else u32()
    ratio = read(3)
    if ratio:
        num, den = _RATIOS[ratio]
        width = height * num // den
    else:
        width = 8 * (read(5) + 1) if small else u32()
    return width, height


class JpegXlImageFile(ImageFile.ImageFile):
    """A JPEG XL image: size from the header at open, pixels decoded by libjxl on load."""

    format = "JXL"
    format_description = "JPEG XL (decoded by imagecodecs)"

    def _open(self) -> None:
        self._data = self.fp.read()
        self._size = image_size(self._data)
        Image._decompression_bomb_check(self._size)
        self._mode = "RGB"  # until decoded: libjxl says whether there is alpha or colour
        self._pixels = None
        try:  # decode now when the whole file is here, for the exact mode
            self._pixels = _decode(self._data)
        except Exception:  # a file cut short: the header still gives its size
            return
        if self._pixels.ndim == 3 and self._pixels.shape[2] == 1:
            self._pixels = self._pixels[..., 0]
        channels = 1 if self._pixels.ndim == 2 else self._pixels.shape[2]
        self._mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
        self.tile = []

    def load(self):
        if self._pixels is None:
            raise OSError("cannot decode this JPEG XL file (cut short or damaged)")
        if self._im is None:
            self.im = Image.fromarray(self._pixels).im
        return Image.Image.load(self)


def _decode(data: bytes):
    import imagecodecs

    pixels = imagecodecs.jpegxl_decode(data)
    if pixels.dtype != "uint8":  # 16-bit or float files: scaled to 8 bits for display
        import numpy as np

        top = 1.0 if pixels.dtype.kind == "f" else float(np.iinfo(pixels.dtype).max)
        pixels = np.clip(np.rint(pixels.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)
    return pixels


def _accept(prefix: bytes) -> bool:
    return is_jpegxl(prefix)


Image.register_open(JpegXlImageFile.format, JpegXlImageFile, _accept)
Image.register_extensions(JpegXlImageFile.format, [".jxl"])
Image.register_mime(JpegXlImageFile.format, "image/jxl")
