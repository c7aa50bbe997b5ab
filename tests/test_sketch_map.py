"""``--condition sketch`` draws what the SDXS sketch ControlNet's authors feed it: black strokes
about 16 px wide (a brush of radius 8) on white, at controlnet_conditioning_scale 0.8
(github.com/IDKiro/sdxs demo_sketch.py; docs/CONDITIONING.md). ``canny`` keeps Canny's own
white-on-black edges."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from fewstep.presets import presets
from worker.conditioning import Conditioning, control_map, pad_colour, place
from worker.control_maps import canny_map, sketch_map


def drawing(size: int = 512) -> Image.Image:
    """A white square and a white disc on black: a few clean edges."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 8, size // 8, size // 2, size // 2), fill="white")
    draw.ellipse((size // 2, size // 2, size - size // 8, size - size // 8), fill="white")
    return image


def strokes_by_scipy(edges: np.ndarray, radius: float) -> np.ndarray:
    """Ink (True) wherever some edge pixel is within ``radius``: SciPy's exact Euclidean
    distance transform, an implementation independent of the OpenCV one the worker uses."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~edges) <= radius


def test_the_sketch_preset_asks_for_the_demos_strokes_and_scale():
    control = presets()["sdxs-512-dreamshaper-sketch"]["control"]
    assert control["scale"] == 0.8
    assert control["sketch"] == {"strokes": "black-on-white", "stroke_width": 16}


def test_sketch_strokes_are_black_on_white_and_16_px_wide_at_512():
    import cv2

    image = drawing(512)
    made = np.asarray(sketch_map(image, 100, 200, "black-on-white", 16))
    grey = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(cv2.GaussianBlur(grey, (5, 5), 0), 100, 200) > 0
    expected = np.where(strokes_by_scipy(edges, 8.0), 0, 255).astype(np.uint8)
    assert np.array_equal(made[..., 0], expected) and (made == made[..., :1]).all()
    assert made.mean() > 128  # mostly white paper
    # Across the square's left side (a vertical edge at x = 64): 16 or 17 px of ink.
    row = made[150, :, 0]
    ink = np.flatnonzero(row[:200] == 0)
    assert 16 <= ink.max() - ink.min() + 1 <= 17


def test_stroke_width_scales_with_the_shorter_side():
    small = np.asarray(sketch_map(drawing(128), 100, 200, "black-on-white", 16))[..., 0]
    ink = np.flatnonzero(small[40, :60] == 0)  # 16 px at 512 is 4 px at 128: radius 2
    assert 4 <= ink.max() - ink.min() + 1 <= 5


def test_stroke_width_follows_the_jobs_canvas_not_the_padded_image():
    import cv2

    image = drawing(64)  # the fitted part of a `pad` job 256 px on its shorter side
    made = np.asarray(sketch_map(image, 100, 200, "black-on-white", 16, side=256))[..., 0]
    grey = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(cv2.GaussianBlur(grey, (5, 5), 0), 100, 200) > 0
    assert np.array_equal(made == 0, strokes_by_scipy(edges, 4.0))  # 16 px at 512: 8 at 256


def test_pad_border_is_paper_for_sketches_and_black_otherwise():
    sketch = Conditioning(condition="sketch", resize="pad")
    assert pad_colour(sketch) == (255, 255, 255)
    assert pad_colour(Conditioning(condition="canny", resize="pad")) == (0, 0, 0)
    padded = np.asarray(place(control_map(drawing(64), sketch), 128, 64, (32, 0), pad_colour(sketch)))
    assert (padded[:, :32] == 255).all() and (padded[:, 96:] == 255).all()


def test_canny_keeps_white_edges_on_black():
    edges = np.asarray(canny_map(drawing(128), 100, 200))
    assert set(np.unique(edges)) == {0, 255} and edges.mean() < 128
