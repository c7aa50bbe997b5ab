"""The ``tiny`` scorer set: random-weight CLIP, aesthetic head and safety checker built locally.

What ``worker/tiny.py`` is for models, this is for ``--score``: the scorers' classes
and file layouts (a ``CLIPModel`` with its tokenizer and ``preprocessor_config.json``, a
``model.safetensors`` of linear layers named like LAION's head, a
``StableDiffusionSafetyChecker`` with its processor config), at tiny widths, created
deterministically and loaded through the same code as the hub's. ``producer enqueue --score
tiny`` (or ``--score clip=tiny``) runs offline on a CPU; the numbers mean nothing.

The tests' hub replicas of the real scorer repositories (``tests/replicas/scorers.py``) are
these same builders, written into a hub cache at the pinned commits.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

from worker import tiny

HIDDEN = 32
#: Widths of the tiny towers, and their image processing: images are resized (shortest edge
#: 40) and centre-cropped (32), so the preprocessing is exercised.
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

#: The scorers of the set, each a folder of the build: clip, aesthetic (its backbone is the
#: set's clip), nsfw, and the preference scorers pickscore and hpsv2 (CLIPs of their own).
SCORERS = ("clip", "aesthetic", "nsfw", "pickscore", "hpsv2")
#: Seeds of the set's CLIPs: each preference scorer gets weights of its own.
CLIP_SEEDS = {"clip": 70, "pickscore": 74, "hpsv2": 75}


def processor(size: dict = TINY):
    """A CLIPImageProcessor: bicubic resize to the shortest edge, centre crop, OpenAI's mean/std."""
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


def spread_vision(vision_model) -> None:
    """Make a random CLIP vision tower give unrelated images unrelated embeddings (in place).

    At transformers' default initialisation the class token, whose final state is the image
    embedding, attends almost uniformly to the patches and what it reads is small next to its
    own constant embedding: unrelated tiny-model images get cosines of about 0.999, so a score
    hardly depends on its image. Three changes, all of them random weights rescaled:

    - each patch filter is made zero-mean over its kernel, per colour channel: it responds to
      shapes, not to the palette the tiny model paints every image in (magenta and blue on
      black; per-channel-centred pixels of its unrelated images correlate ~0.04, raw ones ~0.7);
    - the encoder layers' weights ×3 (what ``initializer_factor=3`` would draw): sharper
      attention, so the class token reads particular patches;
    - attention's value and output weights ×2 more: what it reads outweighs its own embedding.

    Unrelated tiny-model images then have cosines around 0.4 (at most ~0.9); a copy with every
    pixel moved by up to 3 levels keeps ~0.997; one level on a few pixels (the worker's torch
    resize against Pillow's) moves an embedding by ~1e-4.
    """
    import torch

    with torch.no_grad():
        patch = vision_model.embeddings.patch_embedding.weight
        patch.sub_(patch.mean(dim=(2, 3), keepdim=True))
        for layer in vision_model.encoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for linear in (attention.q_proj, attention.k_proj, mlp.fc1, mlp.fc2):
                linear.weight.mul_(3)
            for linear in (attention.v_proj, attention.out_proj):
                linear.weight.mul_(6)


def clip(directory: Path, size: dict = TINY, seed: int = CLIP_SEEDS["clip"]) -> None:
    """A CLIPModel (tiny, or ``size``; weights from ``seed``) with the byte-level CLIP tokenizer
    (every text tokenizes); the tiny one's vision tower tells images apart (:func:`spread_vision`)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = tiny.clip_tokenizer(Path(scratch))
    text = {
        **size["text"],
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text, vision_config=size["vision"], projection_dim=size["projection_dim"])
    model = CLIPModel(config)
    # Random towers give cosines around 0, half of them clipped to a clip_score of 0: a shared
    # component (one projection, a common bias before it) makes most of them positive. With a
    # spread vision tower a smaller one does, and keeps unrelated images' cosines lower.
    tiny_ = size is TINY  # (equal towers' widths only; the real sizes only time it)
    if tiny_:
        spread_vision(model.vision_model)
    shared = 0.7 if tiny_ else 1.0
    with torch.no_grad():
        if tiny_:
            model.visual_projection.weight.copy_(model.text_projection.weight)
        model.vision_model.post_layernorm.bias.fill_(shared)
        model.text_model.final_layer_norm.bias.fill_(shared)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    processor(size).save_pretrained(directory)


def aesthetic_head(path: Path, dim: int = HIDDEN) -> None:
    """LAION's head layout (layers.0/2/4/6/7: Linear with dropout between) at tiny widths
    (LAION's own widths for another ``dim``)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(71)
    widths = [dim, 16, 8, 8, 4, 1] if dim == HIDDEN else [dim, 1024, 128, 64, 16, 1]
    state = {}
    for index, (a, b) in zip((0, 2, 4, 6, 7), itertools.pairwise(widths), strict=True):
        layer = torch.nn.Linear(a, b)
        # x4 per layer: random layers shrink their input, and scores should spread over a few points.
        state[f"layers.{index}.weight"] = 4 * layer.weight.detach().clone()
        state[f"layers.{index}.bias"] = layer.bias.detach().clone()
    state["layers.7.bias"] += 5.0  # centred where the real head's scores lie
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def random_safety_checker(seed: int):
    """A StableDiffusionSafetyChecker with a 32-px, one-layer vision tower and random concepts
    (at the default thresholds of 1.0 it flags nothing)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(seed)
    vision = {
        "hidden_size": HIDDEN,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    config = CLIPConfig(
        text_config={**vision, "vocab_size": 99},
        vision_config={**vision, "image_size": 32, "patch_size": 8},
        projection_dim=HIDDEN,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        torch.nn.init.normal_(checker.concept_embeds)
        torch.nn.init.normal_(checker.special_care_embeds)
    return checker


def safety_checker(directory: Path, size: dict = TINY) -> None:
    """A safety checker whose thresholds lie where random cosines reach them (0.4-0.8), so
    scores spread over (0, 1] and some images would be flagged; the tiny one's vision tower
    tells images apart (:func:`spread_vision`)."""
    import torch

    if size is TINY:
        checker = random_safety_checker(72)
        spread_vision(checker.vision_model)
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
    processor(size).save_pretrained(directory)


def build(directory: Path) -> None:
    """The set in the hub layout: ``clip/``, ``aesthetic/model.safetensors``, ``nsfw/``,
    ``pickscore/`` and ``hpsv2/`` (HPS v2 as its conversion holds it: a CLIP directory)."""
    clip(directory / "clip")
    aesthetic_head(directory / "aesthetic" / "model.safetensors")
    safety_checker(directory / "nsfw")
    clip(directory / "pickscore", seed=CLIP_SEEDS["pickscore"])
    clip(directory / "hpsv2", seed=CLIP_SEEDS["hpsv2"])


def ensure(revision: str) -> Path:
    """The directory of the locally built set, building it on first use (atomically, safe to
    race). ``revision`` is ``config/scorers.toml``'s: bump it there whenever :func:`build` changes."""
    final = tiny.cache_root() / f"tiny-scorers-{revision}"
    if (final / SCORERS[-1] / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-scorers-", dir=final.parent))
    try:
        build(scratch)
        try:
            os.rename(scratch, final)
        except OSError:
            if not (final / SCORERS[-1] / "config.json").is_file():
                raise  # someone else won the race only if the set is there
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def location(model: str, revision: str | None) -> str:
    """A ``builtin:tiny-NAME`` scorer model's local directory (built on first use); any other
    model as given."""
    prefix = "builtin:tiny-"
    if not model.startswith(prefix) or model[len(prefix) :] not in SCORERS:
        return model
    return str(ensure(revision or "v1") / model[len(prefix) :])
