"""Replicas of the repositories whose text encoder is a Qwen-family LLM: FLUX.2 [klein] 4B
(Qwen3, chat template), Qwen-Image (Qwen2.5-VL) and the Qwen-Image-Lightning LoRA files.

The tokenizer is a byte-level Qwen2 tokenizer without merges (one token per byte of text,
the chat markers as special tokens), so a prompt's token count is its length in bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker import tiny

HIDDEN = 16  # the LLM text encoders' width

#: Qwen3's chat template, reduced to what the pipelines render (one user turn, the
#: assistant's turn opened, thinking off): the same text as the real template for them.
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

#: Qwen/Qwen-Image's own scheduler config (which Lightning's card replaces).
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}

#: FLUX.2's scheduler config (dynamic shifting; the klein pipeline computes mu itself).
FLUX2_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "shift": 3.0,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def qwen_tokenizer(*, chat_template: str | None = None):
    """A byte-level Qwen2 tokenizer: every text tokenizes, one token per byte."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(tiny._byte_symbols())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=131072,  # Qwen's: the pipelines cut at their own max_sequence_length
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def flux2_klein_4b(snapshot: Path, files: list[str]) -> None:
    """FLUX.2 [klein] 4B: Flux2KleinPipeline, step-distilled, Qwen3 text encoder."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE)
    torch.manual_seed(500)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=32,
            # The pipeline stacks hidden states 9, 18 and 27, as of the real 36-layer Qwen3-4B.
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    )
    torch.manual_seed(501)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * HIDDEN,  # three stacked hidden states
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,  # klein 4B is distilled without a guidance embedding
    )
    torch.manual_seed(502)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    tiny.widen_last_layer(vae.decoder, 8.0)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,  # the repository's model_index.json
    )
    pipe.save_pretrained(snapshot, safe_serialization=True)


def qwen_image_transformer(seed: int = 511):
    """QwenImageTransformer2DModel in miniature (the base the Lightning LoRAs adapt)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels packed 2x2
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=HIDDEN,
        axes_dims_rope=(2, 2, 4),
    )


def qwen_image(snapshot: Path, files: list[str]) -> None:
    """Qwen/Qwen-Image: QwenImagePipeline, Qwen2.5-VL text encoder, its 3D causal VAE."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    torch.manual_seed(510)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": HIDDEN,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
                "max_position_embeddings": 2048,
            },
            vision_config={
                "depth": 1,
                "hidden_size": HIDDEN,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": HIDDEN,
            },
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
        )
    )
    torch.manual_seed(512)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=qwen_image_transformer(),
    )
    pipe.save_pretrained(snapshot, safe_serialization=True)


def lightning_loras(snapshot: Path, files: list[str]) -> None:
    """lightx2v/Qwen-Image-Lightning: a LoRA file on Qwen-Image's transformer per file named."""
    from diffusers import QwenImagePipeline

    from tests.replicas import parts

    base = qwen_image_transformer()
    for i, filename in enumerate(files):
        parts.write_lora(QwenImagePipeline, base, snapshot, filename, seed=520 + i, component="transformer")
