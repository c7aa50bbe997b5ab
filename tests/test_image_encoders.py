"""The worker's image encoders: lossless ones store exactly the pixels, JPEG XL reads through Pillow."""

from __future__ import annotations

import io

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from fewstep.jpegxl import image_size
from worker.encode import ImageFormat, encode, encoder_label


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A natural photograph (scikit-image's astronaut), 512x512 RGB."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((512, 512), Image.Resampling.LANCZOS))


def test_fpng_png_decodes_in_pillow_to_the_same_pixels_at_close_to_zlib_size(photo):
    fpng = ImageFormat.from_generation({"format": "png", "png_encoder": "fpng"})
    data = encode(photo, fpng)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and np.array_equal(np.asarray(image), photo)
    reference = io.BytesIO()
    Image.fromarray(photo).save(reference, format="PNG", compress_level=6)
    assert len(data) <= 1.2 * len(reference.getvalue())
    assert encoder_label(fpng).startswith("fpng-")


def test_old_png_specs_keep_pillow_at_their_level(photo):
    old = ImageFormat.from_generation({"format": "png", "png_level": 1})  # a spec without png_encoder
    assert (old.png_encoder, old.png_level) == ("pillow", 1)
    expected = io.BytesIO()
    Image.fromarray(photo).save(expected, format="PNG", compress_level=1)
    assert encode(photo, old) == expected.getvalue()
    assert encoder_label(old).startswith("pillow-")


def test_jxl_is_lossless_by_default_and_lossy_with_a_quality(photo):
    lossless = ImageFormat.from_generation({"format": "jxl", "effort": 1})
    data = encode(photo, lossless)
    assert np.array_equal(imagecodecs.jpegxl_decode(data), photo)  # libjxl's own decoder
    image = Image.open(io.BytesIO(data))  # Pillow, through fewstep.jpegxl
    assert (image.format, image.mode, image.size) == ("JXL", "RGB", (512, 512))
    assert np.array_equal(np.asarray(image), photo)
    lossy = encode(photo, ImageFormat.from_generation({"format": "jxl", "quality": 80, "effort": 1}))
    decoded = imagecodecs.jpegxl_decode(lossy)
    assert len(lossy) < len(data) / 3 and not np.array_equal(decoded, photo)
    assert np.abs(decoded.astype(int) - photo).mean() < 4
    assert encoder_label(lossless).startswith("imagecodecs-") and "libjxl" in encoder_label(lossless)


@pytest.mark.parametrize(
    "shape", [(512, 512, 3), (300, 200, 3), (37, 1001, 3), (64, 80, 4), (9, 7), (720, 1280, 3)]
)
@pytest.mark.parametrize("container", [False, True])
def test_jxl_size_is_read_from_the_header_alone_even_of_a_cut_file(shape, container):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = imagecodecs.jpegxl_encode(pixels, lossless=True, effort=1, usecontainer=container)
    assert image_size(data[:64]) == (shape[1], shape[0])
    cut = Image.open(io.BytesIO(data[: len(data) // 2]))
    assert cut.size == (shape[1], shape[0])
    with pytest.raises(OSError):
        cut.load()
    whole = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(whole), pixels)


def test_a_jxl_header_claiming_a_huge_image_is_refused_before_decoding():
    # SizeHeader: not small, height selector 3 (30 bits) = 2**30, ratio 1 (square).
    bits = 0 | (3 << 1) | ((2**30 - 1) << 3) | (1 << 33)
    data = b"\xff\x0a" + bits.to_bytes(9, "little") + bytes(32)
    assert image_size(data) == (2**30, 2**30)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
