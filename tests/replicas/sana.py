"""Replicas of SANA-Sprint 0.6B and 1.6B: Gemma-2 text encoder, linear DiT with embedded
guidance, DC-AE with 32x compression, SCM scheduler."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.replicas import parts

# SCMScheduler settings the pipeline reads beside the class defaults (sigma_data: latent scale).
SCM = {"num_train_timesteps": 1000, "prediction_type": "trigflow", "sigma_data": 0.5}


def _dc_ae(seed: int):
    """AutoencoderDC with six stages: 32x compression, as SANA's DC-AE f32c32 (the pipeline
    derives its scale factor from the number of stages), at a width of 8 channels."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=4,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(8,) * 6,
        decoder_block_out_channels=(8,) * 6,
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 6,
        decoder_qkv_multiscales=((),) * 6,
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def sana_sprint(seed: int):
    """A builder for one SANA-Sprint repository (0.6B and 1.6B differ only in size)."""

    def build(snapshot: Path, files: list[str]) -> None:
        from diffusers import SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler

        tokenizer, text_encoder = parts.gemma2(seed)
        torch.manual_seed(seed + 1)
        transformer = SanaTransformer2DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=1,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=parts.HIDDEN,
            sample_size=32,  # the real one: the pipeline bins sizes to its 1024 px aspect ratios by it
            patch_size=1,
            guidance_embeds=True,  # SANA-Sprint embeds guidance instead of a second CFG batch
            qk_norm="rms_norm_across_heads",
        )
        pipe = SanaSprintPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=_dc_ae(seed + 2),
            transformer=transformer,
            scheduler=SCMScheduler(**SCM),
        )
        pipe.save_pretrained(snapshot, safe_serialization=True)

    return build
