"""Model-only GPU throughput of one-step pipelines at real size, with random weights.

Builds the real architectures from their configs (nothing is downloaded): the SD 2.1-base
UNet (SD-Turbo's shape; not SDXS's, whose UNet drops blocks of it: bench/device/ builds that
one from its own config) with the full SD VAE and with AutoencoderTiny (TAESD) at 512 px,
and the SDXL UNet (SDXL-Turbo's shape) with the fp16-fix SDXL VAE at 1024 px, each with its
real CLIP text encoder(s). Runs the diffusers pipeline itself (text encoder, one
denoising step, VAE decode) at each batch size and prints images/s; no encoding or upload
(that is the end-to-end benchmark's job). Random weights cost the same FLOPs as trained ones.

    python bench/gpu.py                       # fp16 on cuda, batch sizes 1..64, ~5 min on an H100
    python bench/gpu.py --smoke               # tiny configs on the CPU: proves the script runs
    python bench/gpu.py --setup sd21-taesd-512 --batch-sizes 16,32

Writes a JSON result (``--out``). To add a setup, add a builder to ``SETUPS``;
``build_pipeline`` and ``measure`` are importable by other benchmarks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PROMPT = "a watercolor painting of a lighthouse on a cliff at dawn, seagulls, soft light"


# --- real configs (from the repositories' config.json), and their smoke-test miniatures -----


def _sd21_unet(smoke: bool) -> dict:
    if smoke:
        return {"block_out_channels": (32, 64), "layers_per_block": 1, "attention_head_dim": (2, 4),
                "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
                "norm_num_groups": 8, "use_linear_projection": True}  # fmt: skip
    return {
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "attention_head_dim": (5, 10, 20, 20),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
    }


def _sdxl_unet(smoke: bool) -> dict:
    common = {"addition_embed_type": "text_time", "use_linear_projection": True}
    if smoke:
        return {**common, "block_out_channels": (32, 64), "layers_per_block": 1, "attention_head_dim": (2, 4),
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2),
                "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80,
                "cross_attention_dim": 64, "norm_num_groups": 8}  # fmt: skip
    return {
        **common,
        "sample_size": 128,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "cross_attention_dim": 2048,
    }


def _vae_kl(smoke: bool, **config) -> dict:
    blocks = (8, 8) if smoke else (128, 256, 512, 512)
    return {
        "block_out_channels": blocks,
        "down_block_types": ("DownEncoderBlock2D",) * len(blocks),
        "up_block_types": ("UpDecoderBlock2D",) * len(blocks),
        "layers_per_block": 1 if smoke else 2,
        "latent_channels": 4,
        "norm_num_groups": 4 if smoke else 32,
        **config,
    }


def _vae_tiny(smoke: bool) -> dict:
    if smoke:
        return {"encoder_block_out_channels": (8,) * 4, "decoder_block_out_channels": (8,) * 4,
                "num_encoder_blocks": (1,) * 4, "num_decoder_blocks": (1,) * 4}  # fmt: skip
    return {}  # AutoencoderTiny's defaults are TAESD


def _clip(smoke: bool, hidden: int, layers: int, heads: int, act: str, projection: int | None = None) -> dict:
    if smoke:
        hidden, layers, heads, projection = 32, 1, 2, None
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": act,
        "projection_dim": projection or hidden,
        "max_position_embeddings": 77,
    }


# --- setups ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One pipeline to measure: how to build it and the size it renders."""

    name: str
    build: Callable[[bool], object]
    resolution: int
    smoke_resolution: int
    note: str


def _tokenizer():
    from worker.tiny import clip_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        return clip_tokenizer(Path(scratch))  # a byte-level vocabulary: no download


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    with torch.device("cpu"):  # a scheduler keeps its tables on the CPU
        return EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      steps_offset=1, timestep_spacing="trailing")  # fmt: skip


def _sd21(vae_kind: str) -> Callable[[bool], object]:
    def build(smoke: bool):
        from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        unet = _sd21_unet(smoke)
        text = _clip(smoke, 1024, 23, 16, "gelu")
        vae = AutoencoderTiny(**_vae_tiny(smoke)) if vae_kind == "taesd" else AutoencoderKL(**_vae_kl(smoke))
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
            tokenizer=_tokenizer(),
            unet=UNet2DConditionModel(**unet),
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    return build


def _sdxl(smoke: bool):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tokenizer()
    return StableDiffusionXLPipeline(
        # The fp16-fix VAE's config: no upcast to float32 for decoding.
        vae=AutoencoderKL(**_vae_kl(smoke, scaling_factor=0.13025, force_upcast=False)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_clip(smoke, 768, 12, 12, "quick_gelu"))),
        text_encoder_2=CLIPTextModelWithProjection(
            CLIPTextConfig(**_clip(smoke, 1280, 32, 20, "gelu", 1280))
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**_sdxl_unet(smoke)),
        scheduler=_scheduler(),
    )


SETUPS = {
    s.name: s
    for s in (
        Setup("sd21-vae-512", _sd21("kl"), 512, 64, "SD 2.1-base UNet (SD-Turbo shape) + full SD VAE"),
        Setup("sd21-taesd-512", _sd21("taesd"), 512, 64, "SD 2.1-base UNet + TAESD (not SDXS's UNet)"),
        Setup("sdxl-vae-1024", _sdxl, 1024, 128, "SDXL UNet (SDXL-Turbo shape) + fp16-fix SDXL VAE"),
    )
}


def build_pipeline(setup: Setup, device: str, dtype: torch.dtype, smoke: bool):
    """The setup's pipeline with random weights, created directly on ``device`` in ``dtype``."""
    with torch.device(device):  # random init on the GPU: seconds instead of minutes for SDXL
        pipe = setup.build(smoke)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Result:
    setup: str
    batch_size: int
    resolution: int
    steps: int
    images_per_s: float | None = None
    ms_per_image: float | None = None
    calls: int = 0
    peak_gib: float | None = None
    error: str | None = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    pipe, batch: int, resolution: int, device: str, steps: int = 1, min_seconds: float = 2.0
) -> Result:
    """images/s of ``pipe`` at ``batch`` images per call: one warm-up call, then calls for
    at least ``min_seconds`` (and at least two)."""
    result = Result("", batch, resolution, steps)
    generator = torch.Generator("cpu").manual_seed(0)

    def call():
        pipe(
            prompt=[PROMPT] * batch,
            num_inference_steps=steps,
            guidance_scale=0.0,
            width=resolution,
            height=resolution,
            generator=generator,
            output_type="pt",
        )

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        call()
        _sync(device)
        start = time.perf_counter()
        while result.calls < 2 or time.perf_counter() - start < min_seconds:
            call()
            result.calls += 1
        _sync(device)
        seconds = time.perf_counter() - start
    images = batch * result.calls
    result.images_per_s = round(images / seconds, 2)
    result.ms_per_image = round(1000 * seconds / images, 2)
    if device.startswith("cuda"):
        result.peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def _machine(device: str) -> dict:
    import diffusers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": device,
        "cpu": platform.processor() or platform.machine(),
    }
    if device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> int:
    """Run the setups at each batch size; print a table and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU, batch sizes 1,2")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu [cuda; cpu with --smoke]")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="[float16; float32 with --smoke]")  # fmt: skip
    parser.add_argument("--setup", action="append", choices=sorted(SETUPS), help="repeatable [all]")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated [1,2,4,8,16,32,64]")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per image [1]")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timed seconds per batch size [2]")
    parser.add_argument("--budget", type=float, default=450.0, help="stop starting new runs after N s [450]")
    parser.add_argument("--out", default="bench-results/gpu.json", help="JSON result path")
    args = parser.parse_args(argv)

    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    device = args.device or ("cpu" if args.smoke else "cuda")
    dtype = getattr(torch, args.dtype or ("float32" if args.smoke else "float16"))
    sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.smoke else "1,2,4,8,16,32,64")).split(",")]
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA GPU visible (use --smoke to check the script on a CPU)", file=sys.stderr)
        return 2
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    started = time.perf_counter()
    results: list[Result] = []
    print(f"{'setup':<16} {'batch':>5} {'images/s':>9} {'ms/image':>9} {'peak GiB':>8}", flush=True)
    for name in args.setup or list(SETUPS):
        setup = SETUPS[name]
        resolution = setup.smoke_resolution if args.smoke else setup.resolution
        pipe = build_pipeline(setup, device, dtype, args.smoke)
        for batch in sizes:
            if time.perf_counter() - started > args.budget:
                results.append(
                    Result(name, batch, resolution, args.steps, error="skipped: time budget spent")
                )
                continue
            try:
                result = measure(pipe, batch, resolution, device, args.steps, args.min_seconds)
            except torch.OutOfMemoryError:
                result = Result(name, batch, resolution, args.steps, error="out of memory")
                torch.cuda.empty_cache()
            result.setup = name
            results.append(result)
            shown = f"{result.images_per_s:>9.2f} {result.ms_per_image:>9.2f}" if result.error is None else ""
            print(f"{name:<16} {batch:>5} {shown or result.error:>19} {result.peak_gib or '':>8}", flush=True)
            if result.error == "out of memory":
                break  # larger batches will not fit either
        del pipe
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    record = {
        "benchmark": "bench/gpu.py (model-only: text encoder + denoiser + VAE decode, random weights)",
        "command": " ".join(["python", "bench/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "smoke (tiny configs; not a throughput figure)" if args.smoke else "full size",
        "dtype": str(dtype).removeprefix("torch."),
        "machine": _machine(device),
        "setups": {name: SETUPS[name].note for name in args.setup or SETUPS},
        "seconds": round(time.perf_counter() - started, 1),
        "results": [asdict(r) for r in results],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out} ({record['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
