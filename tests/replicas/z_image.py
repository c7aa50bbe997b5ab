"""Replica of Z-Image-Turbo: Qwen3 text encoder behind a chat template, single-stream DiT,
16-channel VAE, flow-match Euler with the repository's fixed shift of 3."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.replicas import parts


def z_image_turbo(snapshot: Path, files: list[str]) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer, text_encoder = parts.qwen3(500)
    torch.manual_seed(501)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=parts.HIDDEN,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 512, 512],  # the real ones: the first indexes caption positions up to 512
    )
    pipe = ZImagePipeline(
        # The repository's scheduler config: a fixed shift of 3, no resolution-dependent shift.
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
        ),
        vae=parts.vae_kl(
            502,
            latent_channels=16,
            blocks=4,
            shift_factor=0.1159,
            scaling_factor=0.3611,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(snapshot, safe_serialization=True)
