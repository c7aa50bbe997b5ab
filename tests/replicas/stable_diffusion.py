"""Replicas of the Stable Diffusion 1.5/2.x repositories (SDXS, SD-Turbo, SD 1.5, LCM
Dreamshaper, InstaFlow) and of the LoRAs fused into SD 1.5 (LCM-LoRA, YOSO, Hyper-SD)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tests.replicas import parts
from worker import tiny

# Scheduler configs as the repositories ship them (scheduler/scheduler_config.json).
BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
PNDM = {**BETAS, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}
EULER_TRAILING = {**BETAS, "steps_offset": 1, "timestep_spacing": "trailing", "prediction_type": "epsilon"}
# IDKiro/sdxs-512-0.9 at 1190a73, scheduler/scheduler_config.json (its PNDM-era keys included).
SDXS_EULER = {
    **EULER_TRAILING,
    "clip_sample": False,
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "use_karras_sigmas": False,
}
LCM = {
    **BETAS,
    "original_inference_steps": 50,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "clip_sample": False,
}


def unet(seed: int, *, time_cond_proj_dim: int | None = None):
    """UNet2DConditionModel, SD 1.x/2.x layout in miniature (the tiny preset's)."""
    torch.manual_seed(seed)
    return tiny.unet(sample_size=32, cross_attention_dim=parts.HIDDEN, time_cond_proj_dim=time_cond_proj_dim)


def _save(pipe, snapshot: Path, variant: str | None) -> None:
    pipe.save_pretrained(snapshot, safe_serialization=True)
    if variant:  # the hub repositories carry both full and fp16 weight files
        pipe.to(torch.float16).save_pretrained(snapshot, safe_serialization=True, variant=variant)


def _pipeline(
    snapshot: Path, seed: int, *, vae, scheduler, checker=None, variant=None, cls_name="", unet_model=None
):
    import diffusers

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = parts.clip_tokenizer(Path(scratch))
    safety, extractor = checker or (None, None)
    cls = getattr(diffusers, cls_name or "StableDiffusionPipeline")
    kwargs = {"requires_safety_checker": False} if safety is None else {}
    pipe = cls(
        vae=vae,
        text_encoder=parts.clip_text(tokenizer, seed + 1),
        tokenizer=tokenizer,
        unet=unet_model or unet(seed + 2),
        scheduler=scheduler,
        safety_checker=safety,
        feature_extractor=extractor,
        **kwargs,
    )
    _save(pipe, snapshot, variant)


def sdxs_09(snapshot: Path, files: list[str]) -> None:
    """SDXS-512-0.9 ships Euler with trailing spacing (its scheduler_config.json)."""
    from diffusers import EulerDiscreteScheduler

    _pipeline(snapshot, 10, vae=parts.vae_tiny(10), scheduler=EulerDiscreteScheduler.from_config(SDXS_EULER))


def sdxs_dreamshaper(snapshot: Path, files: list[str]) -> None:
    from diffusers import PNDMScheduler

    checker = parts.safety_checker(20, flags_everything=False)
    _pipeline(
        snapshot, 20, vae=parts.vae_tiny(20), scheduler=PNDMScheduler.from_config(PNDM), checker=checker
    )


def sdxs_dreamshaper_sketch(snapshot: Path, files: list[str]) -> None:
    """The sketch ControlNet: a ControlNetModel shaped after the DreamShaper replica's UNet, as
    the repository has it (config/hub_files.toml): config.json and a pickle
    diffusion_pytorch_model.bin at the root, no safetensors."""
    tiny.controlnet_for(unet(22), 23).save_pretrained(snapshot, safe_serialization=False)


def sd_turbo(snapshot: Path, files: list[str]) -> None:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(EULER_TRAILING)
    _pipeline(snapshot, 30, vae=parts.vae_kl(30), scheduler=scheduler, variant="fp16")


SD15_SEED = 40


def sd15(snapshot: Path, files: list[str]) -> None:
    """SD 1.5, whose safety checker (in this replica) flags every image."""
    from diffusers import PNDMScheduler

    checker = parts.safety_checker(SD15_SEED, flags_everything=True)
    vae = parts.vae_kl(SD15_SEED)
    _pipeline(
        snapshot,
        SD15_SEED,
        vae=vae,
        scheduler=PNDMScheduler.from_config(PNDM),
        checker=checker,
        variant="fp16",
    )


def lcm_dreamshaper(snapshot: Path, files: list[str]) -> None:
    """A latent consistency model: the UNet takes the guidance scale as an embedding."""
    from diffusers import LCMScheduler

    _pipeline(
        snapshot,
        50,
        vae=parts.vae_kl(50),
        scheduler=LCMScheduler.from_config(LCM),
        checker=parts.safety_checker(50, flags_everything=False),
        cls_name="LatentConsistencyModelPipeline",
        unet_model=unet(52, time_cond_proj_dim=32),
    )


def sd15_lora(snapshot: Path, files: list[str]) -> None:
    """LoRA files for SD 1.5's UNet, under the names the presets ask for."""
    from diffusers import StableDiffusionPipeline

    base = unet(SD15_SEED + 2)
    for i, filename in enumerate(files):
        parts.write_lora(StableDiffusionPipeline, base, snapshot, filename, seed=60 + i)


INSTAFLOW_SEED = 70


def instaflow(snapshot: Path, files: list[str]) -> None:
    """InstaFlow-0.9B: SD 1.5's layout (float32 files only, PNDM config, safety checker) under a
    model_index.json naming the authors' community RectifiedFlowPipeline, as the hub has it."""
    from diffusers import PNDMScheduler

    _pipeline(
        snapshot,
        INSTAFLOW_SEED,
        vae=parts.vae_kl(INSTAFLOW_SEED),
        scheduler=PNDMScheduler.from_config(PNDM),
        checker=parts.safety_checker(INSTAFLOW_SEED, flags_everything=False),
    )
    index = snapshot / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "RectifiedFlowPipeline"}))
