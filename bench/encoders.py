"""Lossless (and JPEG) encoders side by side, in one run: CPU ms per image, bytes, exactness.

Images: scikit-image's colour photographs resized to 512x512 (natural images), the
``synthetic`` model's pictures (what ``bench/pipeline.py`` pushes through the worker), and the
``tiny`` random-weight model's outputs generated at 512x512 (noise, the hardest case).

For each encoder and image set it prints the CPU time per image (the process's CPU time, all
threads, so an encoder that starts threads of its own is charged for them; a busy machine
slows the wall clock but not this much), the mean size, the size relative to
Pillow's PNG at level 6 (what ``--format png`` used before), and whether Pillow decodes the
file to exactly the input pixels (JPEG XL: decoded with ``imagecodecs``, then compared).

    .venv/bin/python bench/encoders.py                  # all encoders, all image sets
    .venv/bin/python bench/encoders.py --seconds 0.5 --no-tiny
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import machine

from worker.synthetic import pictures

SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
                   "retina", "colorwheel", "cat", "skin")  # fmt: skip


def natural_images(size: int = 512) -> np.ndarray:
    """scikit-image's RGB sample photographs, resized (Lanczos) to ``size`` x ``size``."""
    from skimage import data

    out = []
    for name in SKIMAGE_SAMPLES:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            array = loader()
        except Exception:  # a sample that needs a download (pooch) is skipped
            continue
        if array.ndim != 3 or array.shape[2] < 3:
            continue
        image = Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8))
        out.append(np.asarray(image.resize((size, size), Image.Resampling.LANCZOS)))
    return np.stack(out)


def tiny_images(count: int = 4, size: int = 512) -> np.ndarray:
    """The ``tiny`` random-weight SD replica's images at ``size`` x ``size`` (CPU)."""
    from worker.model import load_model

    model = load_model("tiny", "cpu")
    batch = model.generate(
        [f"a photo number {i}" for i in range(count)], list(range(count)), steps=1, guidance=0.0,
        width=size, height=size,
    )  # fmt: skip
    return np.ascontiguousarray(batch.images)


def _pil(fmt: str, **options) -> Callable[[np.ndarray], bytes]:
    def encode(pixels: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format=fmt, **options)
        return out.getvalue()

    return encode


def encoders() -> dict[str, Callable[[np.ndarray], bytes]]:
    """Every encoder measured, by label; ones whose library is missing are left out."""
    found: dict[str, Callable[[np.ndarray], bytes]] = {
        f"PIL PNG level {level}": _pil("PNG", compress_level=level) for level in (6, 3, 1, 0)
    }
    found["PIL JPEG q90"] = _pil("JPEG", quality=90)
    try:
        import imagecodecs as ic

        for level in (1, 2, 3, 6):
            found[f"imagecodecs png (libpng) level {level}"] = lambda p, lv=level: ic.png_encode(p, level=lv)
        found["imagecodecs png level 1, RLE, SUB (its fast preset)"] = lambda p: ic.png_encode(
            p, level=1, strategy=3, filter=16
        )
        for level in (1, 3, 6):
            found[f"imagecodecs png level {level}, filter SUB"] = lambda p, lv=level: ic.png_encode(
                p, level=lv, filter=16
            )
        for level in (1, 3):
            found[f"imagecodecs spng level {level}"] = lambda p, lv=level: ic.spng_encode(p, level=lv)
        for effort in (1, 2, 3):
            found[f"imagecodecs jpegxl lossless effort {effort}"] = lambda p, e=effort: ic.jpegxl_encode(
                p, lossless=True, effort=e, numthreads=1
            )
    except ImportError:
        pass
    try:
        import fpng

        found["fpng (py-fpng-nb)"] = fpng.from_ndarray
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)
        for level in (1, 3):
            for strategy, label in ((cv2.IMWRITE_PNG_STRATEGY_DEFAULT, "default"),
                                    (cv2.IMWRITE_PNG_STRATEGY_RLE, "RLE"),
                                    (cv2.IMWRITE_PNG_STRATEGY_FILTERED, "filtered")):  # fmt: skip
                params = [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_STRATEGY, strategy]
                found[f"opencv png level {level}, {label}"] = lambda p, pr=params: cv2.imencode(
                    ".png", p[..., ::-1], pr
                )[1].tobytes()
    except ImportError:
        pass
    try:
        import pillow_jxl  # noqa: F401  (registers JXL with Pillow)

        for effort in (1, 2):
            found[f"pillow-jxl-plugin lossless effort {effort}"] = _pil("JXL", lossless=True, effort=effort)
    except ImportError:
        pass
    return found


def decoded(data: bytes) -> np.ndarray:
    """Pixels of ``data`` as Pillow decodes them (JPEG XL through imagecodecs)."""
    if data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        import imagecodecs

        return imagecodecs.jpegxl_decode(data)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def measure(encode: Callable[[np.ndarray], bytes], images: np.ndarray, seconds: float):
    """(CPU ms per image, mean bytes, every image decoded to the same pixels)."""
    sizes, exact = [], True
    for image in images:
        data = encode(image)
        sizes.append(len(data))
        exact = exact and np.array_equal(decoded(data), image)
    start, count = time.process_time(), 0
    while time.process_time() - start < seconds or count < len(images):
        encode(images[count % len(images)])
        count += 1
    return 1000 * (time.process_time() - start) / count, float(np.mean(sizes)), exact


def main() -> None:
    """Measure every encoder on every image set and print one table per set."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per encoder and set.")
    parser.add_argument("--no-tiny", action="store_true", help="Leave out the tiny model's images.")
    args = parser.parse_args()
    print(machine())
    sets = {"natural 512x512 (scikit-image samples)": natural_images(),
            "synthetic model's pictures 512x512": pictures(512, 512)[:8]}  # fmt: skip
    if not args.no_tiny:
        sets["tiny random-weight model 512x512"] = tiny_images()
    found = encoders()
    for name, images in sets.items():
        print(f"\n{name}: {len(images)} images")
        baseline = None
        print(
            "| encoder | CPU ms / image | KiB / image | bytes / PIL level 6 | pixels identical |\n"
            "|---|---:|---:|---:|---|"
        )
        for label, encode in found.items():
            ms, size, exact = measure(encode, images, args.seconds)
            baseline = baseline or size  # the first encoder is PIL level 6
            lossy = "JPEG" in label
            print(f"| {label} | {ms:.2f} | {size / 1024:.0f} | {size / baseline:.3f} | "
                  f"{'n/a (lossy)' if lossy else 'yes' if exact else 'NO'} |")  # fmt: skip


if __name__ == "__main__":
    main()
