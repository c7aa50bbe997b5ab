"""Preference scores (``--score pickscore,hpsv2``) against independent computations.

The replicas (``tests/replicas/scorers.py``) are laid out as the real repositories are:
PickScore's weights without a processor (its card takes it from LAION's CLIP-H, replicated as
tokenizer and preprocessing only) and HPS v2.1's ``HPS_v2.1_compressed.pt``, a float16 pickle
in OpenCLIP's names. The worker scores the images on the tensor; the test scores the same
images, as PNG-free PIL images, with:

- PickScore: its model card's code (``CLIPProcessor`` of the processor repository,
  ``CLIPModel`` of PickScore's, ``logit_scale.exp() * text_embs @ image_embs.T``);
- HPS v2.1: OpenCLIP's ViT forward written out here in plain torch from the pickle's state
  dict (``in_proj`` attention, pre-LayerNorm blocks, GELU, class token and argmax-token
  pooling, ``x @ proj``), as HPS v2's ``img_score.py`` calls it (normalised features, their
  dot product) -- not through the worker's conversion to transformers' layout.

Tolerances as in test_scores.py: 0.25 for PickScore (about 100 x a cosine), 2e-3 for HPS's
cosine: the worker resizes in torch, the processor in PIL (one level apart on a few pixels).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep import UserError
from fewstep.scorers import scorer_presets, scoring_spec
from tests.replicas import scorers as replicas
from tests.replicas.hub import HubCache, offline

PICKSCORE_TOLERANCE = 0.25
COSINE_TOLERANCE = 2e-3
PROMPTS = ["a red cube on a table", "two cats on a sofa, oil painting", "", "a lighthouse at night"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> HubCache:
    return replicas.build(tmp_path_factory.mktemp("preference-hub"))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Four distinct 64x64 images: smooth gradients with noise (resized to 40, cropped to 32)."""
    rng = np.random.default_rng(5)
    ramp = np.linspace(0, 255, 64)[None, :, None]
    base = [
        ramp * rng.uniform(0.2, 1, 3) + ramp.transpose(1, 0, 2) * rng.uniform(0.2, 1, 3) for _ in range(4)
    ]
    return np.stack([np.clip(b / 2 + rng.normal(0, 30, (64, 64, 3)), 0, 255) for b in base]).astype(np.uint8)


def snapshot(hub: HubCache, repo: str, revision: str):
    return hub.snapshot(repo, revision)


def processor_dir(hub: HubCache):
    p = scorer_presets()["pickscore"]["processor"]
    return snapshot(hub, p["repo"], p["revision"])


@torch.no_grad()
def card_pickscore(hub: HubCache, pictures: list[Image.Image], prompts: list[str]) -> np.ndarray:
    """PickScore's model card: processor from the processor repository, model from PickScore's."""
    from transformers import CLIPModel, CLIPProcessor

    preset = scorer_presets()["pickscore"]
    processor = CLIPProcessor.from_pretrained(processor_dir(hub))
    model = CLIPModel.from_pretrained(snapshot(hub, preset["repo"], preset["revision"])).eval()
    image_inputs = processor(images=pictures, return_tensors="pt")
    text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")

    def features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    image_embs = features(model.get_image_features(**image_inputs))
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
    text_embs = features(model.get_text_features(**text_inputs))
    text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    return (model.logit_scale.exp() * (text_embs @ image_embs.T)).diagonal().numpy()


def _transformer(
    x: torch.Tensor, state: dict, prefix: str, heads: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """OpenCLIP's residual attention blocks (batch first), pre-LayerNorm, exact GELU."""
    import torch.nn.functional as F

    n, t, w = x.shape

    def split(y: torch.Tensor) -> torch.Tensor:  # (n, t, w) -> (n, heads, t, w / heads)
        return y.view(n, t, heads, w // heads).transpose(1, 2)

    i = 0
    while f"{prefix}resblocks.{i}.ln_1.weight" in state:
        block = {k.removeprefix(f"{prefix}resblocks.{i}."): v for k, v in state.items()
                 if k.startswith(f"{prefix}resblocks.{i}.")}  # fmt: skip
        b = block.__getitem__
        h = F.layer_norm(x, x.shape[-1:], b("ln_1.weight"), b("ln_1.bias"), 1e-5)
        q, k, v = (h @ b("attn.in_proj_weight").T + b("attn.in_proj_bias")).chunk(3, dim=-1)
        attn = (split(q) @ split(k).transpose(-1, -2)) / (w // heads) ** 0.5
        if mask is not None:
            attn = attn + mask
        o = (attn.softmax(-1) @ split(v)).transpose(1, 2).reshape(n, t, w)
        x = x + o @ b("attn.out_proj.weight").T + b("attn.out_proj.bias")
        h = F.layer_norm(x, x.shape[-1:], b("ln_2.weight"), b("ln_2.bias"), 1e-5)
        h = F.gelu(h @ b("mlp.c_fc.weight").T + b("mlp.c_fc.bias"))
        x = x + h @ b("mlp.c_proj.weight").T + b("mlp.c_proj.bias")
        i += 1
    return x


@torch.no_grad()
def open_clip_hps(hub: HubCache, pictures: list[Image.Image], prompts: list[str], heads: int) -> np.ndarray:
    """HPS v2's score (normalised image features . normalised text features) by OpenCLIP's
    forward in plain torch, from the pickle's state dict."""
    import torch.nn.functional as F
    from transformers import CLIPImageProcessor, CLIPTokenizer

    preset = scorer_presets()["hpsv2"]
    path = snapshot(hub, preset["repo"], preset["revision"]) / preset["file"]
    s = {k: v.float() for k, v in torch.load(path, weights_only=True)["state_dict"].items()}
    pixels = CLIPImageProcessor.from_pretrained(processor_dir(hub))(
        pictures, return_tensors="pt"
    ).pixel_values
    # Vision: patches, class token, positions, ln_pre, blocks, ln_post on the class token, proj.
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=s["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = (
        torch.cat([s["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1)
        + s["visual.positional_embedding"]
    )
    x = F.layer_norm(x, x.shape[-1:], s["visual.ln_pre.weight"], s["visual.ln_pre.bias"], 1e-5)
    x = _transformer(x, s, "visual.transformer.", heads, None)
    image = F.layer_norm(x[:, 0], x.shape[-1:], s["visual.ln_post.weight"], s["visual.ln_post.bias"], 1e-5)
    image = F.normalize(image @ s["visual.proj"], dim=-1)
    # Text: tokens padded to the context length, causal mask, ln_final, the argmax token, proj.
    tokens = CLIPTokenizer.from_pretrained(processor_dir(hub))(
        prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
    ).input_ids
    t = s["token_embedding.weight"][tokens] + s["positional_embedding"]
    mask = torch.full((77, 77), float("-inf")).triu(1)
    t = _transformer(t, s, "transformer.", heads, mask)
    t = F.layer_norm(t, t.shape[-1:], s["ln_final.weight"], s["ln_final.bias"], 1e-5)
    text = F.normalize(t[torch.arange(len(t)), tokens.argmax(-1)] @ s["text_projection"], dim=-1)
    return (image @ text.T).diagonal().numpy()


def hps_spec(hub: HubCache, **changes) -> dict:
    """``--score pickscore,hpsv2``'s spec, the HPS entry pinned to the replica's sha256 and head
    widths (the real file's are in config/scorers.toml) unless ``changes`` say otherwise."""
    spec = scoring_spec(["pickscore,hpsv2"])
    preset = scorer_presets()["hpsv2"]
    path = snapshot(hub, preset["repo"], preset["revision"]) / preset["file"]
    replica = {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "architecture": replicas.OPEN_CLIP_HEAD_WIDTHS,
    }
    spec["scorers"]["hpsv2"].update({**replica, **changes})
    return spec


def test_pickscore_and_hps_v21_score_like_the_card_and_open_clips_forward(hub, images, tmp_path, monkeypatch):
    from worker.scoring import Scoring

    monkeypatch.setenv("FEWSTEP_MODEL_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("FEWSTEP_ALLOW_PICKLE_CONVERSION", "1")
    with offline(hub.root):
        scored = Scoring("cpu").score(hps_spec(hub), images, PROMPTS)
    pictures = [Image.fromarray(a) for a in images]
    pick = card_pickscore(hub, pictures, PROMPTS)
    heads = replicas.HIDDEN // replicas.OPEN_CLIP_HEAD_WIDTHS["vision_head_width"]
    hps = open_clip_hps(hub, pictures, PROMPTS, heads)
    np.testing.assert_allclose(scored.columns["pickscore"], pick, rtol=0, atol=PICKSCORE_TOLERANCE)
    np.testing.assert_allclose(scored.columns["hpsv2"], hps, rtol=0, atol=COSINE_TOLERANCE)
    # The comparisons tell rows apart: every two rows' independent scores differ by more than
    # the tolerance, so a worker that paired a prompt with another row's image would fail.
    for values, tolerance in ((pick, PICKSCORE_TOLERANCE), (hps, COSINE_TOLERANCE)):
        apart = np.abs(values[:, None] - values[None, :])[np.triu_indices(len(values), 1)]
        assert apart.min() > 2 * tolerance, values
    # PickScore multiplies by the model's logit scale (the replica's e^4.6), HPS does not.
    assert np.abs(pick).max() > 5 and np.abs(hps).max() <= 1
    # The conversion is a transformers CLIP directory, kept for the next start and for --score hpsv2=DIR.
    [converted] = (tmp_path / "models" / "converted").iterdir()
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        f.name for f in converted.iterdir()
    }
    with offline(hub.root):
        again = Scoring("cpu").score(scoring_spec([f"hpsv2={converted}"]), images, PROMPTS)
    assert again.columns["hpsv2"] == scored.columns["hpsv2"]


def test_hps_pickle_is_converted_only_on_the_opt_in_and_only_with_the_pinned_sha256(
    hub, images, tmp_path, monkeypatch
):
    from worker.scoring import Scoring

    monkeypatch.setenv("FEWSTEP_MODEL_CACHE", str(tmp_path / "models"))
    monkeypatch.delenv("FEWSTEP_ALLOW_PICKLE_CONVERSION", raising=False)
    with offline(hub.root), pytest.raises(UserError) as refused:
        Scoring("cpu").score(hps_spec(hub), images[:1], PROMPTS[:1])
    message = str(refused.value)
    assert message.startswith("hpsv2: xswu/HPSv2/HPS_v2.1_compressed.pt is published as a pickle only")
    assert "--allow-pickle-conversion" in message and "\n" not in message
    # With the opt-in, a file whose sha256 is not the pinned one (config/scorers.toml's, the
    # real file's) is refused, and nothing is converted.
    monkeypatch.setenv("FEWSTEP_ALLOW_PICKLE_CONVERSION", "1")
    pinned = scorer_presets()["hpsv2"]["sha256"]
    with offline(hub.root), pytest.raises(UserError, match=f"not the pinned {pinned}; refusing to convert"):
        Scoring("cpu").score(hps_spec(hub, sha256=pinned), images[:1], PROMPTS[:1])
    assert not (tmp_path / "models" / "converted").exists() or not any(
        (tmp_path / "models" / "converted").iterdir()
    )


def test_score_option_records_pickscore_and_hps_models_revisions_processor_and_licences(hub):
    presets = scorer_presets()
    spec = scoring_spec(["pickscore,hpsv2"])["scorers"]
    for name in ("pickscore", "hpsv2"):
        p = presets[name]
        assert (spec[name]["model"], spec[name]["revision"], spec[name]["licence"]) == (
            p["repo"], p["revision"], p["licence"],
        )  # fmt: skip
        assert spec[name]["processor"] == {
            "model": p["processor"]["repo"],
            "revision": p["processor"]["revision"],
        }
    assert spec["hpsv2"]["file"] == "HPS_v2.1_compressed.pt" and spec["hpsv2"]["pickle"] is True
    assert spec["hpsv2"]["architecture"] == {"vision_head_width": 80, "text_head_width": 64}
    # The tiny set has both, each its own random CLIP directory (no processor, no pickle).
    tiny = scoring_spec(["pickscore=tiny,hpsv2=tiny"])["scorers"]
    assert {n: (s["model"], "processor" in s, "pickle" in s) for n, s in tiny.items()} == {
        "pickscore": ("builtin:tiny-pickscore", False, False), "hpsv2": ("builtin:tiny-hpsv2", False, False),
    }  # fmt: skip
