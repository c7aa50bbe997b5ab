"""Tiny random-weight replicas of the scorer repositories ``config/scorers.toml`` names.

Each is written into a hub cache (``hub.py``) at the commit its preset pins, in the layout
the real repository has: a ``CLIPModel`` with its tokenizer and ``preprocessor_config.json``
(clip), a ``model.safetensors`` of linear layers named like LAION's head (aesthetic), a
``StableDiffusionSafetyChecker`` with its processor config (nsfw), PickScore's ``CLIPModel``
weights and config without a processor (its card takes the processor from LAION's CLIP-H,
replicated with the tokenizer and ``preprocessor_config.json`` only), and HPS v2.1's pickle
``HPS_v2.1_compressed.pt``: ``{"state_dict": ...}`` in OpenCLIP's names (:func:`open_clip_state`).
They are the builders of
the ``tiny`` scorer set (``worker/tiny_scorers.py``), which resize (shortest edge 40) and
centre-crop (32) the images they see, so the preprocessing is exercised, with vision
towers that tell images apart (``tiny_scorers.spread_vision``): a score that hardly depends
on its image could not show that the worker scored the right one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fewstep.scorers import scorer_presets
from tests.replicas.hub import HubCache
from worker.tiny_scorers import CLIP_SEEDS, HIDDEN, TINY, aesthetic_head, clip, safety_checker

#: The OpenCLIP head widths of the HPS v2 replica (ViT-H-14's are 80 and 64): 2 heads a tower.
OPEN_CLIP_HEAD_WIDTHS = {"vision_head_width": HIDDEN // 2, "text_head_width": HIDDEN // 2}

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
    if size is TINY:
        preference(hub, presets)
    return hub


def preference(hub: HubCache, presets: dict) -> None:
    """PickScore's repository (weights, no processor), the processor repository both scorers
    name (LAION's CLIP-H: tokenizer and preprocessing only), and HPS v2.1's pickle."""
    import torch

    pick = hub.snapshot(presets["pickscore"]["repo"], presets["pickscore"]["revision"])
    clip(pick, seed=CLIP_SEEDS["pickscore"])
    processor = presets["pickscore"]["processor"]
    laion = hub.snapshot(processor["repo"], processor["revision"])
    for f in list(pick.iterdir()):
        if f.name not in ("config.json", "model.safetensors"):
            shutil.move(str(f), laion / f.name)
    from safetensors.torch import load_file, save_file

    state = load_file(pick / "model.safetensors")
    state["logit_scale"] = torch.tensor(4.6)  # PickScore's own scale (about 100), not CLIP's initial 1/0.07
    save_file(state, pick / "model.safetensors", metadata={"format": "pt"})
    hps = presets["hpsv2"]
    from transformers import CLIPTokenizer

    vocab = len(CLIPTokenizer.from_pretrained(laion))
    path = hub.snapshot(hps["repo"], hps["revision"]) / hps["file"]
    torch.save({"epoch": 1, "state_dict": open_clip_state(vocab)}, path)


def open_clip_state(vocab: int, width: int = HIDDEN, layers: int = 2, image: int = 32, patch: int = 8,
                    context: int = 77, seed: int = 76) -> dict:  # fmt: skip
    """A random OpenCLIP CLIP's state dict, in OpenCLIP's names and shapes (both towers
    ``width`` wide, 4x MLPs, projections to ``width``), scaled so its embeddings vary."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=g)

    def blocks(prefix: str) -> dict:
        out = {}
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            out.update({
                f"{b}ln_1.weight": 1 + rand(width, scale=0.1), f"{b}ln_1.bias": rand(width, scale=0.1),
                f"{b}attn.in_proj_weight": rand(3 * width, width), f"{b}attn.in_proj_bias": rand(3 * width),
                f"{b}attn.out_proj.weight": rand(width, width), f"{b}attn.out_proj.bias": rand(width),
                f"{b}ln_2.weight": 1 + rand(width, scale=0.1), f"{b}ln_2.bias": rand(width, scale=0.1),
                f"{b}mlp.c_fc.weight": rand(4 * width, width), f"{b}mlp.c_fc.bias": rand(4 * width),
                f"{b}mlp.c_proj.weight": rand(width, 4 * width), f"{b}mlp.c_proj.bias": rand(width),
            })  # fmt: skip
        return out

    grid = image // patch
    state = {
        "token_embedding.weight": rand(vocab, width, scale=1.0),
        "positional_embedding": rand(context, width),
        "ln_final.weight": 1 + rand(width, scale=0.1), "ln_final.bias": rand(width, scale=0.1),
        "text_projection": rand(width, width),
        "logit_scale": torch.tensor(4.6052),
        "visual.class_embedding": rand(width),
        "visual.conv1.weight": rand(width, 3, patch, patch),
        "visual.positional_embedding": rand(grid * grid + 1, width),
        "visual.ln_pre.weight": 1 + rand(width, scale=0.1), "visual.ln_pre.bias": rand(width, scale=0.1),
        "visual.ln_post.weight": 1 + rand(width, scale=0.1), "visual.ln_post.bias": rand(width, scale=0.1),
        "visual.proj": rand(width, width),
        **blocks(""), **blocks("visual."),
    }  # fmt: skip
    # float16, as "compressed" is: the real file's 1.97 GB for ViT-H-14's ~986M parameters.
    return {k: v.half() for k, v in state.items()}
