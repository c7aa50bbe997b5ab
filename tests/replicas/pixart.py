"""Replicas of PixArt-α (T5 text encoder with a SentencePiece tokenizer trained here, DiT
transformer, DPM-Solver) and of the YOSO transformers loaded into it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tests.replicas import parts

DPM = {
    "algorithm_type": "dpmsolver++",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "solver_order": 2,
    "steps_offset": 0,
}


def transformer(seed: int, sample_size: int):
    """The PixArt DiT in miniature. ``sample_size`` (latent pixels) is the real one: the
    pipeline picks its aspect-ratio bins by it (64: 512 px, 128: 1024 px); the patch grows
    with it so the token count stays small."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=2,
        patch_size=sample_size // 16,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=parts.HIDDEN,
        in_channels=4,
        out_channels=8,  # learned sigma, as PixArt-α: the pipeline keeps the first half
        cross_attention_dim=24,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def _legacy_class_name(path: Path, key: str | None = None) -> None:
    # The hub files predate PixArtTransformer2DModel and name Transformer2DModel (diffusers remaps it).
    data = json.loads(path.read_text())
    if key is None:
        data["_class_name"] = "Transformer2DModel"
    else:
        data[key] = ["diffusers", "Transformer2DModel"]
    path.write_text(json.dumps(data, indent=2))


def pixart_512(snapshot: Path, files: list[str]) -> None:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer, text_encoder = parts.t5(Path(scratch), seed=200, max_length=120)
        pipe = PixArtAlphaPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=parts.vae_kl(201, blocks=4),
            transformer=transformer(202, sample_size=64),
            scheduler=DPMSolverMultistepScheduler.from_config(DPM),
        )
        pipe.save_pretrained(snapshot, safe_serialization=True)
        # As on the hub: fp16 files for the T5 and the VAE, none for the transformer.
        for name in ("text_encoder", "vae"):
            part = getattr(pipe, name).to(torch.float16)
            part.save_pretrained(snapshot / name, safe_serialization=True, variant="fp16")
        parts.replace_t5_tokenizer(snapshot, "tokenizer", Path(scratch))
    _legacy_class_name(snapshot / "model_index.json", "transformer")
    _legacy_class_name(snapshot / "transformer" / "config.json")


def yoso_512(snapshot: Path, files: list[str]) -> None:
    transformer(210, sample_size=64).save_pretrained(snapshot)
    _legacy_class_name(snapshot / "config.json")


def yoso_1024(snapshot: Path, files: list[str]) -> None:
    transformer(220, sample_size=128).save_pretrained(snapshot)
    _legacy_class_name(snapshot / "config.json")


# DDPM settings of PixArt-α's training noise schedule (linear betas), which the DMD student
# was distilled on; the repository ships them as its `scheduler` folder.
DDPM = {k: DPM[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")}


def dmd_512(snapshot: Path, files: list[str]) -> None:
    """PixArt-Alpha-DMD-XL-2-512x512 as the hub has it: a `transformer` (pickle weights) and a
    DDPM `scheduler` folder and a model_index.json, no text encoder, tokenizer or VAE (those
    come from the base)."""
    from diffusers import DDPMScheduler

    # Its only weights are a pickle (transformer/diffusion_pytorch_model.bin), as on the hub.
    transformer(230, sample_size=64).save_pretrained(snapshot / "transformer", safe_serialization=False)
    _legacy_class_name(snapshot / "transformer" / "config.json")
    DDPMScheduler(**DDPM, prediction_type="epsilon").save_pretrained(snapshot / "scheduler")
    index = {
        "_class_name": "PixArtAlphaPipeline",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (snapshot / "model_index.json").write_text(json.dumps(index, indent=2))
