"""Replicas of the SDXL repositories (SDXL base 1.0, SDXL-Turbo), the fp16-fix VAE, and the
files other repositories add to SDXL base (SDXL-Lightning UNets, DMD2's LoRA and UNet)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tests.replicas import parts
from tests.replicas.stable_diffusion import BETAS, _save
from worker import tiny

EULER = {**BETAS, "steps_offset": 1, "prediction_type": "epsilon", "interpolation_type": "linear"}
BASE_SEED = 100


def unet(seed: int):
    """UNet2DConditionModel, SDXL layout in miniature (text_time conditioning, two encoders)."""
    torch.manual_seed(seed)
    return tiny.unet(
        sample_size=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + parts.HIDDEN,
        cross_attention_dim=2 * parts.HIDDEN,
    )


def _pipeline(snapshot: Path, seed: int, scheduler) -> None:
    from diffusers import StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = parts.clip_tokenizer(Path(scratch))
    pipe = StableDiffusionXLPipeline(
        vae=parts.vae_kl(seed, force_upcast=True, scaling_factor=0.13025),
        text_encoder=parts.clip_text(tokenizer, seed + 1),
        text_encoder_2=parts.clip_text(tokenizer, seed + 2, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet(seed + 3),
        scheduler=scheduler,
    )
    _save(pipe, snapshot, "fp16")


def sdxl_base(snapshot: Path, files: list[str]) -> None:
    from diffusers import EulerDiscreteScheduler

    _pipeline(
        snapshot, BASE_SEED, EulerDiscreteScheduler.from_config({**EULER, "timestep_spacing": "leading"})
    )


def sdxl_turbo(snapshot: Path, files: list[str]) -> None:
    from diffusers import EulerAncestralDiscreteScheduler

    _pipeline(
        snapshot, 110, EulerAncestralDiscreteScheduler.from_config({**EULER, "timestep_spacing": "trailing"})
    )


def vae_fp16_fix(snapshot: Path, files: list[str]) -> None:
    """The fp16-fix VAE: an AutoencoderKL at the repository root."""
    parts.vae_kl(120, force_upcast=False, scaling_factor=0.13025).save_pretrained(snapshot)


def base_unet_files(snapshot: Path, files: list[str]) -> None:
    """Files for SDXL base's UNet: bare UNet checkpoints, LoRAs, and pickles (to be refused)."""
    from diffusers import StableDiffusionXLPipeline

    base = unet(BASE_SEED + 3)
    for i, filename in enumerate(files):
        if "lora" in filename:
            parts.write_lora(StableDiffusionXLPipeline, base, snapshot, filename, seed=130 + i)
        elif filename.endswith(".safetensors"):
            parts.write_checkpoint(base, snapshot / filename, seed=140 + i)
        else:
            torch.save(base.state_dict(), snapshot / filename)
