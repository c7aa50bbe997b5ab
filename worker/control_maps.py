"""Control maps traced from a resized image: what a ControlNet preset is given.

- ``canny``: ``cv2.Canny`` of the resized RGB image (OpenCV takes the strongest channel's
  gradient) at the job's thresholds, white edges on black, as diffusers' ControlNet examples do;
- ``sketch``: a pen drawing as the preset's sketch ControlNet is fed (``[NAME.control.sketch]``;
  SDXS: black strokes about 16 px wide on white, as its authors' demo canvas hands them over,
  docs/CONDITIONING.md). From any image: grey, a 5×5 Gaussian blur (photo texture is no
  stroke), Canny at ``[conditioning] sketch_low/high``, then every pixel within half the stroke
  width (scaled by the job's shorter side / 512) of an edge is ink: a round brush of that width
  drawn along the edges. A drawing already in the ControlNet's polarity goes in with ``as-is``.
  ``pad`` fills the border with the paper's colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def canny_map(image: Image.Image, low: int, high: int) -> Image.Image:
    """White Canny edges on black, of the RGB image, as an RGB map."""
    import cv2

    edges = cv2.Canny(np.asarray(image), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def sketch_map(
    image: Image.Image,
    low: int,
    high: int,
    strokes: str = "black-on-white",
    width: float = 16.0,
    side: int | None = None,
) -> Image.Image:
    """Pen strokes traced from the image (see the module docstring): ink wherever an edge is
    within half the stroke width, ``width`` being at a 512-pixel shorter ``side`` of the
    canvas the map goes on (the image's own by default; ``pad`` puts it on a larger one)."""
    import cv2

    grey = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(cv2.GaussianBlur(grey, (5, 5), 0), low, high)
    radius = width / 2 * (side or min(image.size)) / 512
    # Exact Euclidean distance of every pixel to the nearest edge pixel (edges are its zeros).
    distance = cv2.distanceTransform(255 - edges, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ink = (distance <= radius) & edges.any()
    if strokes not in ("black-on-white", "white-on-black"):
        raise ValueError(f"unknown sketch strokes {strokes!r}: black-on-white or white-on-black")
    paper, pen = (255, 0) if strokes == "black-on-white" else (0, 255)
    drawn = np.where(ink, pen, paper).astype(np.uint8)
    return Image.fromarray(np.stack([drawn] * 3, axis=-1))
