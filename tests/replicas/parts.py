"""Tiny random-weight parts the replicas share: tokenizers, text encoders, VAEs, the safety
checker, LoRA files. Same classes as the real repositories, small configs, fixed seeds."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import torch

from worker import tiny

HIDDEN = 32  # text encoders' width everywhere

# Sentences the T5 SentencePiece model is trained on (PixArt, Flux and SD3 read T5 tokens).
SENTENCES = [
    "a photo of a cat sitting on a red chair",
    "an astronaut riding a horse on the moon",
    "a bowl of soup that looks like a monster, knitted out of wool",
    "the quick brown fox jumps over the lazy dog",
    "a watercolor painting of a lighthouse at dawn",
    "two blue cubes next to a green sphere",
]


def clip_tokenizer(scratch: Path):
    """A byte-level CLIP tokenizer (the tiny preset's): every text tokenizes."""
    return tiny.clip_tokenizer(scratch)


def clip_text(tokenizer, seed: int, *, projection: bool = False):
    """CLIPTextModel, or CLIPTextModelWithProjection (SDXL's and SD3's second encoder)."""
    torch.manual_seed(seed)
    return tiny.clip_text(tokenizer, projection=projection, hidden=HIDDEN)


def write_t5_tokenizer(directory: Path, max_length: int) -> None:
    """A T5 tokenizer folder as the hub has it: a SentencePiece model trained here, no tokenizer.json."""
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4),
        model_writer=model,
        vocab_size=48,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    (directory / "spiece.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": 100,
        "model_max_length": max_length,
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def t5(directory: Path, seed: int, max_length: int = 512):
    """(T5Tokenizer read from the SentencePiece folder, tiny T5EncoderModel)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    write_t5_tokenizer(directory, max_length)
    tokenizer = T5Tokenizer.from_pretrained(directory)
    torch.manual_seed(seed)
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=HIDDEN,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    )
    return tokenizer, encoder


def replace_t5_tokenizer(snapshot: Path, folder: str, source: Path) -> None:
    """Swap the tokenizer folder ``save_pretrained`` wrote for the hub's SentencePiece-only one."""
    target = snapshot / folder
    for path in target.iterdir():
        path.unlink()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())


def vae_kl(seed: int, *, latent_channels: int = 4, blocks: int = 2, **config):
    """AutoencoderKL with 2**(blocks-1) downsampling; the last decoder layer widened so that
    images vary visibly with the latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(8,) * blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **config,
    )
    tiny.widen_last_layer(vae.decoder, 8.0)
    return vae


def vae_tiny(seed: int):
    """AutoencoderTiny (TAESD), as SDXS ships in its ``vae`` folder."""
    torch.manual_seed(seed)
    return tiny.vae_tiny(8)


def safety_checker(seed: int, *, flags_everything: bool):
    """(StableDiffusionSafetyChecker, CLIPImageProcessor) at 32 px.

    Random embeddings flag nothing at the default thresholds (1.0); thresholds of -1 flag every
    image, so tests can see both outcomes.
    """
    from transformers import CLIPImageProcessor

    from worker.tiny_scorers import random_safety_checker

    checker = random_safety_checker(seed)
    if flags_everything:
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-1.0)
    extractor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    return checker, extractor


def write_lora(
    pipeline_cls, model, directory: Path, filename: str, seed: int, component: str = "unet"
) -> None:
    """A random LoRA on the attention projections of ``model``, the pipeline's ``component``
    (its UNet or transformer), saved as the pipeline saves LoRAs."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    adapted = copy.deepcopy(model)
    adapted.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(adapted))
    pipeline_cls.save_lora_weights(directory, **{f"{component}_lora_layers": layers}, weight_name=filename)


def write_checkpoint(model, path: Path, seed: int, dtype=torch.float16) -> None:
    """``model``'s architecture with other random weights, as one bare safetensors state dict."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_file({k: v.to(dtype).contiguous() for k, v in other.state_dict().items()}, path)


# Letters as single tokens and "▁" + letter merged, as SentencePiece BPE tokenizers (Gemma) do,
# so that a space before a word joins the word: SANA's instruction prefix ends in a space.
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def gemma2(seed: int):
    """(GemmaTokenizer, tiny Gemma2Model), SANA's text encoder in miniature.

    The tokenizer is Gemma's: byte fallback for every other character, a begin token and no
    end token, and no ``model_max_length`` of its own (the real one's is unbounded too)."""
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    for token in [*_LETTERS, "▁", *(f"▁{c}" for c in _LETTERS)]:
        vocab.setdefault(token, len(vocab))
    tokenizer = GemmaTokenizer(
        vocab=vocab, merges=[("▁", c) for c in _LETTERS], add_bos_token=True, add_eos_token=False
    )
    torch.manual_seed(seed)
    encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(vocab),
            hidden_size=HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    )
    return tokenizer, encoder


# The part of Qwen3's chat template that ZImagePipeline's one user message with
# add_generation_prompt and enable_thinking=True renders (no system prompt, no <think> block).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def qwen3(seed: int):
    """(Qwen2Tokenizer, tiny Qwen3Model), Z-Image's text encoder in miniature.

    Byte-level BPE over all 256 bytes, with "user" and "assistant" merged into single tokens as
    in Qwen's vocabulary, so the chat template costs the same number of tokens as the real one."""
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = []
    for word in ("user", "assistant"):
        for end in range(2, len(word) + 1):
            merges.append((word[: end - 1], word[end - 1]))
            vocab.setdefault(word[:end], len(vocab))
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, chat_template=QWEN3_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    torch.manual_seed(seed)
    encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(vocab),
            hidden_size=HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    )
    return tokenizer, encoder
