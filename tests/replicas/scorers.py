"""Tiny random-weight replicas of the scorer repositories ``config/scorers.toml`` names.

Each is written into a hub cache (``hub.py``) at the commit its preset pins, in the layout
the real repository has: a ``CLIPModel`` with its tokenizer and ``preprocessor_config.json``
(clip), a ``model.safetensors`` of linear layers named like LAION's head (aesthetic), and a
``StableDiffusionSafetyChecker`` with its processor config (nsfw). The images they see are
resized (shortest edge 40) and centre-cropped (32), so the preprocessing is exercised.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import torch

from fewstep.scorers import scorer_presets
from tests.replicas import parts
from tests.replicas.hub import HubCache

HIDDEN = 32
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
TINY = {
    "text": {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
    "vision": {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "projection_dim": HIDDEN,
    "processor": {"shortest_edge": 40, "crop": 32},
}
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def _processor(size: dict = TINY):
    from transformers import CLIPImageProcessor

    edge, crop = size["processor"]["shortest_edge"], size["processor"]["crop"]
    return CLIPImageProcessor(
        size={"shortest_edge": edge},
        crop_size={"height": crop, "width": crop},
        do_center_crop=True,
        resample=3,
        image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD,
    )


def clip(directory: Path, size: dict = TINY) -> None:
    """A CLIPModel (tiny, or ``size``) with the byte-level CLIP tokenizer (every text tokenizes)."""
    from transformers import CLIPConfig, CLIPModel

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = parts.clip_tokenizer(Path(scratch))
    text = {
        **size["text"],
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(70)
    config = CLIPConfig(text_config=text, vision_config=size["vision"], projection_dim=size["projection_dim"])
    model = CLIPModel(config)
    # Random towers give cosines around 0, half of them clipped to a clip_score of 0: a shared
    # component (one projection, a common bias before it) makes most of them positive.
    with torch.no_grad():
        if size is TINY:  # (equal towers' widths only; the real sizes only time it)
            model.visual_projection.weight.copy_(model.text_projection.weight)
        model.vision_model.post_layernorm.bias.fill_(1.0)
        model.text_model.final_layer_norm.bias.fill_(1.0)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    _processor(size).save_pretrained(directory)


def aesthetic_head(path: Path, dim: int = HIDDEN) -> None:
    """LAION's head layout (layers.0/2/4/6/7: Linear with dropout between) at tiny widths."""
    from safetensors.torch import save_file

    torch.manual_seed(71)
    widths = [dim, 16, 8, 8, 4, 1] if dim == HIDDEN else [dim, 1024, 128, 64, 16, 1]  # LAION's widths
    state = {}
    for index, (a, b) in zip((0, 2, 4, 6, 7), itertools.pairwise(widths), strict=True):
        layer = torch.nn.Linear(a, b)
        # x4 per layer: random layers shrink their input, and scores should spread over a few points.
        state[f"layers.{index}.weight"] = 4 * layer.weight.detach().clone()
        state[f"layers.{index}.bias"] = layer.bias.detach().clone()
    state["layers.7.bias"] += 5.0  # centred where the real head's scores lie
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def safety_checker(directory: Path, size: dict = TINY) -> None:
    """A tiny safety checker whose thresholds lie where random cosines reach them (0.4-0.8),
    so scores spread over (0, 1] and some images would be flagged."""
    if size is TINY:
        checker, _extractor = parts.safety_checker(72, flags_everything=False)
    else:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPConfig

        config = CLIPConfig(vision_config=size["vision"], projection_dim=size["projection_dim"])
        checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        torch.manual_seed(73)
        checker.concept_embeds_weights.uniform_(0.4, 0.8)
        checker.special_care_embeds_weights.uniform_(0.4, 0.8)
    checker.save_pretrained(directory, safe_serialization=True)
    _processor(size).save_pretrained(directory)


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
