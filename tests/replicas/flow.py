"""Replicas of the flow-matching transformer repositories: FLUX.1 [schnell] and Stable
Diffusion 3.5 Large Turbo (CLIP + T5 text encoders, MMDiT, 16-channel-style VAE)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tests.replicas import parts


def flux_schnell(snapshot: Path, files: list[str]) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = parts.clip_tokenizer(Path(scratch) / "clip")
        tokenizer_2, text_encoder_2 = parts.t5(Path(scratch) / "t5", seed=300)
        torch.manual_seed(301)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=parts.HIDDEN,
            pooled_projection_dim=parts.HIDDEN,
            guidance_embeds=False,  # schnell is distilled without guidance
            axes_dims_rope=(2, 2, 4),
        )
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
            vae=parts.vae_kl(
                302,
                shift_factor=0.1159,
                scaling_factor=0.3611,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            text_encoder=parts.clip_text(tokenizer, 303),
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
        pipe.save_pretrained(snapshot, safe_serialization=True)


def sd35_large_turbo(snapshot: Path, files: list[str]) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = parts.clip_tokenizer(Path(scratch) / "clip")
        tokenizer_3, text_encoder_3 = parts.t5(Path(scratch) / "t5", seed=400, max_length=256)
        torch.manual_seed(401)
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=parts.HIDDEN,
            joint_attention_dim=parts.HIDDEN,
            pooled_projection_dim=2 * parts.HIDDEN,
            out_channels=4,
            qk_norm="rms_norm",
        )
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=parts.vae_kl(
                402,
                shift_factor=0.0609,
                scaling_factor=1.5305,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            text_encoder=parts.clip_text(tokenizer, 403, projection=True),
            tokenizer=tokenizer,
            text_encoder_2=parts.clip_text(tokenizer, 404, projection=True),
            tokenizer_2=tokenizer,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            transformer=transformer,
        )
        pipe.save_pretrained(snapshot, safe_serialization=True)
