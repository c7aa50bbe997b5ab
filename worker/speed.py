"""Speed options for a loaded model, applied after ``load_model`` and before the first shard.

- **precision** (``--dtype float16|bfloat16``): casts the pipeline. The CPU stays float32.
- **channels_last** memory format for the denoiser and the VAE (faster convolutions on
  tensor cores); on by default on CUDA.
- **attention**: PyTorch's scaled-dot-product attention (flash / memory-efficient kernels)
  for UNets that still have the classic processors.
- **torch.compile** (``--compile``, opt-in) of the denoiser, once the batch size is chosen.
  Compiling happens in the warm-up, before the first shard, so it counts in no reported rate.
- **tiny VAE** (``--vae tiny``): decode with AutoencoderTiny — ``taesd`` for SD1/SD2,
  ``taesdxl`` for SDXL. Their latents are not interchangeable, so the family decides.
- **a preset's other VAE** (``--vae NAME``, the preset's ``vaes`` table): e.g. SDXL-Turbo's
  ``fp16-fix``, which stays finite in float16 where the card's VAE is upcast to float32.
- **batch size** (``--batch-size auto``, the default on CUDA): measured per resolution the
  first time a shard asks for it, see :func:`choose_batch_size` and :mod:`worker.batching`.

The options that change pixels (precision, VAE) are recorded in every metadata row; all of
them are in the per-shard stats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fewstep import UserError
from fewstep.settings import defaults
from worker.batching import free_cached_memory, is_batch_too_large
from worker.model import Model, _diffusers_class, _dtype_kwarg, _from_pretrained, _source, _torch_dtype

log = logging.getLogger("fewstep.worker")

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
#: Every model takes these; a preset may name others in its ``vaes`` table.
VAES = ("default", "tiny")
PROBE_PROMPT = "a photograph of a lighthouse on a cliff at sunset, detailed"


@dataclass
class SpeedOptions:
    """What the worker's flags ask for (None: the device's default)."""

    dtype: str | None = None
    channels_last: bool | None = None
    attention: str = "sdpa"
    compile: str = "off"
    vae: str = "default"


def family(model: Model) -> str:
    """``sdxl``, ``sd`` (SD1/SD2) or the pipeline's class name for anything else."""
    declared = model.preset.get("family")
    if declared:
        return "sdxl" if declared == "sdxl" else "sd" if declared in ("sd1", "sd2", "sd") else declared
    pipe = model.pipeline
    if getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "unet", None) is not None:
        return "sdxl"
    if type(pipe).__name__.startswith("StableDiffusion") and hasattr(pipe, "unet"):
        return "sd"
    return type(pipe).__name__


def tiny_vae_repo(model_family: str) -> str:
    """The AutoencoderTiny for a family (``config/defaults.toml`` [tiny_vae]): hub id or directory."""
    repos = defaults()["tiny_vae"]
    if model_family not in repos:
        raise UserError(
            f"--vae tiny works for SD1/SD2 (taesd) and SDXL (taesdxl) pipelines, not {model_family}"
        )
    return repos[model_family]


def _load_tiny_vae(repo: str, torch_dtype):
    from diffusers import AutoencoderTiny

    try:
        return _from_pretrained(AutoencoderTiny, repo, f"tiny VAE {repo}", **{_dtype_kwarg(): torch_dtype})
    except UserError as e:
        raise UserError(f"{e} (offline? point [tiny_vae] in config/defaults.toml at a local copy)") from None


def vae_choices(preset: dict[str, Any]) -> tuple[str, ...]:
    """The ``--vae`` values a preset takes: the built-in ones, then its own ``vaes``."""
    return (*VAES, *(preset.get("vaes") or {}))


def _load_preset_vae(model: Model, name: str):
    """The preset's VAE ``name`` (class, repo, revision), on the model's device and dtype;
    returns it and how the metadata names it (``name:repo@revision``)."""
    import torch

    spec = model.preset["vaes"][name]
    cls = _diffusers_class(spec["class"], "component")
    vae = _from_pretrained(
        cls,
        spec["repo"],
        f"{model.name} --vae {name}",
        **_source(spec),
        **{_dtype_kwarg(): getattr(torch, model.dtype)},
    )
    return vae.to(model.device), f"{name}:{spec['repo']}@{spec.get('revision', 'main')}"


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def apply(model: Model, options: SpeedOptions) -> dict[str, Any]:
    """Apply ``options`` to ``model`` in place; returns what was applied (for logs and stats)."""
    import torch

    applied: dict[str, Any] = {}
    if model.pipeline is None:  # the synthetic benchmark model has nothing to tune
        return applied
    pipe, cuda = model.pipeline, model.device.startswith("cuda")
    if options.dtype and options.dtype != model.dtype:
        torch_dtype, dtype = _torch_dtype(options.dtype, model.device)  # the CPU stays float32
        if dtype == options.dtype:
            pipe.to(dtype=torch_dtype)
            model.dtype = dtype
        else:
            log.warning(
                "--dtype %s ignored on the CPU (half precision there is slow or unsupported)", options.dtype
            )
    if options.vae == "tiny":
        repo = tiny_vae_repo(family(model))
        pipe.vae = _load_tiny_vae(repo, getattr(torch, model.dtype)).to(model.device)
        applied["vae"] = f"tiny:{repo}"
    elif options.vae in (model.preset.get("vaes") or {}):
        pipe.vae, applied["vae"] = _load_preset_vae(model, options.vae)
    elif options.vae != "default":
        choices = ", ".join(vae_choices(model.preset))
        raise UserError(f"unknown --vae {options.vae!r} for model {model.name}: use {choices}")
    denoiser = _denoiser(pipe)
    if options.channels_last if options.channels_last is not None else cuda:
        for module in (denoiser, getattr(pipe, "vae", None)):
            if module is not None:
                module.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    applied["attention"] = _use_sdpa(denoiser) if options.attention == "sdpa" else "default"
    if options.compile not in COMPILE_MODES:
        raise UserError(f"unknown --compile mode {options.compile!r}: use {', '.join(COMPILE_MODES)}")
    return applied


def compile_denoiser(model: Model, mode: str) -> bool:
    """torch.compile the UNet or transformer (lazily: the warm-up compiles it); False if none.

    Under ``--batch-size auto`` the sizes probed at a resolution's first use compile too
    (torch.compile turns the batch dimension dynamic after the first new shape); a fixed
    ``--batch-size`` compiles once, in the warm-up.
    """
    denoiser = _denoiser(model.pipeline) if model.pipeline is not None else None
    if mode == "off" or denoiser is None:
        return False
    denoiser.compile(mode=None if mode == "default" else mode)
    return True


def _use_sdpa(denoiser) -> str:
    """Switch classic attention processors to SDPA; returns the attention in use."""
    if denoiser is None or not hasattr(denoiser, "attn_processors"):
        return "default"
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    kinds = {type(p) for p in denoiser.attn_processors.values()}
    if kinds <= {AttnProcessor, AttnProcessor2_0}:
        if AttnProcessor in kinds:
            denoiser.set_attn_processor(AttnProcessor2_0())
        return "sdpa"
    return "default"  # other architectures' processors (SD3, Flux, ...) already use SDPA


def run_batch(model: Model, batch_size: int, width: int | None = None, height: int | None = None) -> None:
    """One batch of ``batch_size`` at the preset's steps, at ``width`` x ``height`` (default:
    the preset's size): probes, warm-up, benchmarks."""
    preset = model.preset
    width, height = width or int(preset["width"]), height or int(preset["height"])
    model.generate(
        [PROBE_PROMPT] * batch_size,
        list(range(batch_size)),
        steps=int(preset["steps"]),
        guidance=float(preset["guidance"]),
        width=width,
        height=height,
        **model.probe_inputs(batch_size, width, height),
    )


def warm_up(
    model: Model, batch_size: int, batches: int, width: int | None = None, height: int | None = None
) -> float:
    """Run ``batches`` batches so lazy set-up, compilation and autotuning happen before the
    first shard; returns the seconds it took."""
    start = time.perf_counter()
    for _ in range(batches):
        run_batch(model, batch_size, width, height)
    return time.perf_counter() - start


def choose_batch_size(
    measure: Callable[[int], float], *, limit: int, gain: float = 0.05, out_of_memory: tuple = ()
) -> tuple[int, list[tuple[int, float]]]:
    """The batch size to run, by measurement: returns it and the (size, images/s) measured.

    Doubles the size from 1 while it fits (``measure`` raises one of ``out_of_memory``
    when it does not) and while doubling still raises throughput by ``gain`` or more; past
    that, bigger batches cost memory and pipeline latency for nothing. ``measure(n)``
    returns the seconds one batch of ``n`` takes.
    """
    measured: list[tuple[int, float]] = []
    size = 1
    while size <= limit:
        try:
            rate = size / measure(size)
        except out_of_memory:
            break
        if measured and rate < measured[-1][1] * (1 + gain):
            measured.append((size, rate))
            return measured[-2][0], measured
        measured.append((size, rate))
        size *= 2
    if not measured:
        raise UserError("not even a batch of 1 image fits in the device's memory")
    return measured[-1][0], measured


class _TooLarge(Exception):
    """A probed batch size did not fit the device."""


def auto_batch_size(model: Model, limit: int, width: int | None = None, height: int | None = None) -> int:
    """Measure this model on its device at ``width`` x ``height`` (default: the preset's size)
    and choose a batch size (see :func:`choose_batch_size`); a size too large for the device
    (:func:`worker.batching.is_batch_too_large`) ends the doubling like running out of memory."""
    width, height = width or int(model.preset["width"]), height or int(model.preset["height"])

    def measure(n: int) -> float:
        try:
            run_batch(model, n, width, height)  # the first call of a size pays for allocation and autotuning
            start = time.perf_counter()
            run_batch(model, n, width, height)
            return time.perf_counter() - start
        except Exception as e:
            if not is_batch_too_large(e):
                raise
        # Out of the except block: the failed batch's tensors went with its traceback.
        free_cached_memory()
        raise _TooLarge(n)

    size, measured = choose_batch_size(measure, limit=limit, out_of_memory=(_TooLarge,))
    log.info(
        "batch size %d chosen by measurement at %dx%d (%s)",
        size,
        width,
        height,
        ", ".join(f"{n}: {rate:.1f} img/s" for n, rate in measured),
    )
    return size
