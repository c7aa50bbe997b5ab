"""The ``tiny`` preset: a small random-weight Stable Diffusion replica built locally.

Same architecture family and component classes as the real presets (UNet2DConditionModel,
AutoencoderTiny, CLIPTextModel, CLIPTokenizer, Euler scheduler), created deterministically,
saved with ``save_pretrained`` in the hub's layout, and then loaded through the same
``from_pretrained`` path as hub models. It runs offline on a CPU in milliseconds per image.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """Where locally built models live (``FEWSTEP_MODEL_CACHE`` overrides)."""
    return Path(os.environ.get("FEWSTEP_MODEL_CACHE") or Path.home() / ".cache" / "fewstep" / "models")


def _byte_symbols() -> list[str]:
    # GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the
    # rest to code points from 256 up, so every byte has a visible symbol.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tokenizer_files(directory: Path) -> dict[str, int]:
    """A byte-level CLIP vocabulary (no merges): every text tokenizes, one token per byte."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for s in symbols:
            vocab[s + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return vocab


def clip_tokenizer(scratch: Path):
    """A byte-level CLIP tokenizer (its files written to ``scratch``): every text tokenizes."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(scratch)
    return CLIPTokenizer.from_pretrained(scratch, model_max_length=77)


def clip_text(tokenizer, *, projection: bool = False, hidden: int = 32):
    """A small CLIPTextModel (or CLIPTextModelWithProjection, SDXL's and SD3's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def unet(**overrides):
    """A small UNet2DConditionModel in the SD 1.x/2.x layout (``overrides`` reshape it, e.g. to SDXL's)."""
    from diffusers import UNet2DConditionModel

    config = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }
    return UNet2DConditionModel(**{**config, **overrides})


def widen_last_layer(coder, factor: float) -> None:
    """Scale the last convolution of a random encoder or decoder by ``factor`` (bias zeroed):
    random ones squash what passes through them (see :func:`vae_tiny`)."""
    import torch

    with torch.no_grad():
        last = [m for m in coder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.weight.mul_(factor)
        last.bias.zero_()


def vae_tiny(channels: int):
    """A small AutoencoderTiny (TAESD's architecture), its encoder and decoder widened.

    A random decoder outputs near-constant grey, and a random encoder maps unrelated images to
    nearly one latent (std ~0.04): ×8 on the decoder's last layer makes images vary visibly
    with the seed and prompt, ×32 on the encoder's makes an img2img result depend on its init
    image (a 2-step, strength-0.5 result moves by up to ~30 levels from one image to another,
    against 1 level unwidened)."""
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny(
        encoder_block_out_channels=(channels,) * 4,
        decoder_block_out_channels=(channels,) * 4,
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    widen_last_layer(vae.encoder, 32.0)
    widen_last_layer(vae.decoder, 8.0)
    return vae


def controlnet_for(unet_model, seed: int):
    """A small ControlNetModel shaped after ``unet_model``, its zero convolutions given random
    weights: a trained ControlNet starts from zeros, and one left so would ignore its maps."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet_model, conditioning_embedding_out_channels=(8, 16, 32, 32))
    with torch.no_grad():
        for block in [
            *net.controlnet_down_blocks,
            net.controlnet_mid_block,
            net.controlnet_cond_embedding.conv_out,
        ]:
            block.weight.normal_(0.0, 2.0)
            block.bias.zero_()
    return net


def build(directory: Path, controlnet: bool = False) -> None:
    """Create the tiny pipeline with fixed seeds and save it in the hub layout (``controlnet``:
    the StableDiffusionControlNetPipeline of the ``tiny-controlnet`` preset, the same tiny
    model with a tiny ControlNet)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = clip_tokenizer(Path(scratch))
    torch.manual_seed(0)
    text_encoder = clip_text(tokenizer)
    vae = vae_tiny(16)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="trailing",
    )
    parts = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet(),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    if controlnet:
        pipe = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet_for(parts["unet"], 1))
    else:
        pipe = StableDiffusionPipeline(**parts)
    pipe.save_pretrained(directory, safe_serialization=True)


#: Locally built models: preset repo ``builtin:<name>`` → whether it has a ControlNet.
BUILDS = {"tiny": False, "tiny-controlnet": True}


def ensure(revision: str, name: str = "tiny") -> Path:
    """The directory of the locally built model ``name`` (``tiny`` or ``tiny-controlnet``),
    building it on first use (atomically, safe to race).

    ``revision`` is the preset's: bump it there whenever :func:`build` changes.
    """
    final = cache_root() / f"{name}-{revision}"
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-", dir=final.parent))
    try:
        build(scratch, controlnet=BUILDS[name])
        try:
            os.rename(scratch, final)
        except OSError:
            if not (final / "model_index.json").is_file():
                raise  # someone else won the race only if the model is there
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final
