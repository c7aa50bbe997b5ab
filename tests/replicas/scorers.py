"""Tiny random-weight replicas of the scorer repositories ``config/scorers.toml`` names.

Each is written into a hub cache (``hub.py``) at the commit its preset pins, in the layout
the real repository has: a ``CLIPModel`` with its tokenizer and ``preprocessor_config.json``
(clip), a ``model.safetensors`` of linear layers named like LAION's head (aesthetic), and a
``StableDiffusionSafetyChecker`` with its processor config (nsfw). They are the builders of
the ``tiny`` scorer set (``worker/tiny_scorers.py``), which resize (shortest edge 40) and
centre-crop (32) the images they see, so the preprocessing is exercised, with vision
towers that tell images apart (``tiny_scorers.spread_vision``): a score that hardly depends
on its image could not show that the worker scored the right one.
"""

from __future__ import annotations

from pathlib import Path

from fewstep.scorers import scorer_presets
from tests.replicas.hub import HubCache
from worker.tiny_scorers import HIDDEN, TINY, aesthetic_head, clip, safety_checker  # noqa: F401 (HIDDEN: tests)

#: The real repositories' sizes (OpenAI CLIP ViT-L/14; the safety checker's vision tower is the
#: same), random weights: what ``bench/scoring.py --scorers vit-l14`` times.
VIT_L14 = {
    "text": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "vision": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
    },
    "projection_dim": 768,
    "processor": {"shortest_edge": 224, "crop": 224},
}


def build(root: Path, size: dict = TINY) -> HubCache:
    """Write every scorer preset's replica (tiny, or ``size``: :data:`VIT_L14`) into a hub cache
    at ``root``, at its pinned revision."""
    hub = HubCache(root)
    presets = scorer_presets()
    clip(hub.snapshot(presets["clip"]["repo"], presets["clip"]["revision"]), size)
    aesthetic = presets["aesthetic"]
    path = hub.snapshot(aesthetic["repo"], aesthetic["revision"]) / aesthetic["file"]
    aesthetic_head(path, size["projection_dim"])
    safety_checker(hub.snapshot(presets["nsfw"]["repo"], presets["nsfw"]["revision"]), size)
    return hub
