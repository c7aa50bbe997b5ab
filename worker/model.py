"""A model preset turned into a loaded pipeline, and images out of it.

``load_model`` is the one function that turns a preset (``config/models.toml``) into a
diffusers pipeline: ``from_pretrained`` with safetensors only, no remote code, then the
preset's scheduler. ``Model.generate`` runs a batch with one seeded generator per
image, so an image depends on its seed and prompt, not on its batch-mates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fewstep import UserError
from fewstep.presets import resolve_model

log = logging.getLogger("fewstep.worker")

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Batch:
    """What one pipeline call produced."""

    images: np.ndarray  # (N, H, W, 3) uint8 (a device tensor with keep_on_device)
    nsfw: list[bool | None]
    seconds: float


@dataclass
class Model:
    """A pinned, loaded model."""

    name: str
    preset: dict[str, Any]
    pipeline: Any
    device: str
    dtype: str
    revision: str | None
    sampler: str
    load_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int,
        guidance: float,
        width: int,
        height: int,
        keep_on_device: bool = False,
    ) -> Batch:
        """Images for ``prompts``, image i from ``seeds[i]`` (CPU generators: device-independent noise).

        With ``keep_on_device`` the images stay a uint8 tensor on the model's device, so the
        encode stage can copy them asynchronously or encode them there.
        """
        import torch

        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.pipeline(
                prompt=list(prompts),
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=generators,
                output_type="pt",
            )
            pixels = out.images
            if pixels.ndim == 4 and pixels.shape[1] in (1, 3):
                pixels = pixels.permute(0, 2, 3, 1)
            images = (pixels.float() * 255).round().clamp(0, 255).to(torch.uint8)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)  # so `seconds` is the device's time, not launch time
            if not keep_on_device:
                images = images.cpu().numpy()
        seconds = time.perf_counter() - start
        flags = getattr(out, "nsfw_content_detected", None)
        nsfw = [bool(f) for f in flags] if flags is not None else [None] * len(prompts)
        return Batch(images=images, nsfw=nsfw, seconds=seconds)

    def count_tokens(self, prompts: list[str]) -> tuple[list[int], int]:
        """Token count of each prompt (untruncated) and the text encoder's limit."""
        tokenizer = getattr(self.pipeline, "tokenizer", None)
        if tokenizer is None:
            return [0] * len(prompts), 0
        ids = tokenizer(list(prompts), truncation=False, add_special_tokens=True)["input_ids"]
        return [len(i) for i in ids], int(tokenizer.model_max_length)


def _torch_dtype(name: str, device: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPES)}")
    if device == "cpu" and name != "float32":
        return torch.float32, "float32"  # half precision on CPU is slow or unsupported
    return getattr(torch, name), name


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; validates the rest."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible to this process")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        return device
    if device != "cpu":
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    return device


def _hub_revision(repo: str, revision: str | None) -> str | None:
    """The commit a hub revision resolved to, read from the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "model_index.json", revision=revision)
    if isinstance(found, str):
        parts = Path(found).parts
        if "snapshots" in parts:
            return parts[parts.index("snapshots") + 1]
    return revision


def _dtype_kwarg() -> str:
    # Newer diffusers renamed from_pretrained's `torch_dtype` to `dtype` (and warn on the old name).
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _pipeline_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UserError(f"preset names unknown pipeline class {name!r}")
    return cls


def _from_pretrained(cls, location: str, label: str, **kwargs):
    try:
        # use_safetensors=True refuses pickle weights; no custom_pipeline, no remote code.
        return cls.from_pretrained(location, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        text = str(e)
        if "safetensors" in text.lower():
            raise UserError(
                f"model {label}: no safetensors weights found; fewstep refuses pickle (.bin) weights"
            ) from None
        if (
            "offline" in text.lower()
            or "cannot find the requested files" in text.lower()
            or "connect" in text.lower()
        ):
            raise UserError(
                f"model {label} is not in the local Hugging Face cache and the hub cannot be reached"
            ) from None
        raise UserError(
            f"cannot load model {label}: {text.splitlines()[0] if text else type(e).__name__}"
        ) from None


def load_model(name: str, device: str = "auto") -> Model:
    """Load ``name`` (preset, hub id or directory) once, ready to generate on ``device``."""
    import diffusers

    preset = resolve_model(name)
    if preset.get("repo") == "builtin:synthetic":  # benchmarks only: no weights, no device
        from worker import synthetic

        return synthetic.load(name, preset, "cpu")
    device = resolve_device(device)
    torch_dtype, dtype = _torch_dtype(preset.get("dtype", "float32"), device)
    start = time.perf_counter()
    diffusers.utils.logging.set_verbosity_error()  # its truncation warning would log prompts

    repo = preset["repo"]
    revision = preset.get("revision")
    if repo == "builtin:tiny":
        from worker import tiny

        location, kwargs = str(tiny.ensure()), {}
    elif preset["kind"] == "local":
        location, kwargs = repo, {}
        revision = None
    else:
        location, kwargs = repo, {"revision": revision}
    cls = _pipeline_class(preset.get("pipeline", "DiffusionPipeline"))
    kwargs[_dtype_kwarg()] = torch_dtype
    pipe = _from_pretrained(cls, location, name, **kwargs)

    sampler = preset.get("sampler") or type(pipe.scheduler).__name__
    scheduler = dict(preset.get("scheduler") or {})
    if scheduler:
        scheduler_cls = getattr(diffusers, scheduler.pop("class"))
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if preset["kind"] == "hub" or (preset["kind"] == "preset" and not repo.startswith("builtin:")):
        revision = _hub_revision(repo, revision)
    model = Model(
        name=name,
        preset=preset,
        pipeline=pipe,
        device=device,
        dtype=dtype,
        revision=revision,
        sampler=sampler,
        load_seconds=time.perf_counter() - start,
    )
    log.info(
        "loaded model %s (revision %s) on %s as %s in %.1fs",
        name,
        revision,
        device,
        dtype,
        model.load_seconds,
    )
    return model
