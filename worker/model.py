"""A model preset turned into a loaded pipeline, and images out of it.

``load_model`` turns a preset (``config/models.toml``) into a diffusers pipeline with one
data-driven recipe, every step driven by a field the preset declares:

1. ``components``: parts loaded first and handed to the pipeline: a model folder of
   another repository (a VAE, a transformer), or a bare checkpoint ``file`` loaded into
   the base repository's architecture (a UNet-only checkpoint);
2. the pipeline ``from_pretrained`` from ``repo`` at ``revision`` (``variant`` if any);
3. ``lora``: LoRA weights loaded, fused into the weights at ``scale`` and unloaded;
4. ``scheduler``: the sampler's scheduler class and config overrides.

Weights load as safetensors only, never with remote code or a hub ``custom_pipeline``: a
pickle ``.bin`` is refused, unless the preset names it as a pickle-only component with its
sha256, which :mod:`worker.pickle_weights` converts once on an explicit opt-in. The loaded
:class:`worker.loaded_model.Model`'s
``generate`` runs a batch with one seeded generator per image, so an image depends on its
seed and prompt, not on its batch-mates.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fewstep import UserError
from fewstep.presets import resolve_model
from worker import pickle_weights, synthetic
from worker.loaded_model import Model, TokenCounter, _diffusers_class

log = logging.getLogger("fewstep.worker")

DTYPES = ("float32", "float16", "bfloat16")


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


def _commit(repo: str, revision: str | None, filename: str) -> str | None:
    """The commit a hub revision resolved to, read from the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    if isinstance(found, str):
        parts = Path(found).parts
        if "snapshots" in parts:
            return parts[parts.index("snapshots") + 1]
    return revision


def _revision(preset: dict[str, Any]) -> str | None:
    """What ran, for the ``model_revision`` column: the base commit, then ``part=repo@commit``
    for every part that came from another repository."""
    if preset["kind"] == "local" or preset["repo"].startswith("builtin:"):
        return preset.get("revision")
    words = [_commit(preset["repo"], preset.get("revision"), "model_index.json")]
    parts = {**preset.get("components", {}), "lora": preset.get("lora")}
    for name, spec in parts.items():
        if spec and "repo" in spec:
            probe = spec.get("file") or "/".join(filter(None, [spec.get("subfolder"), "config.json"]))
            words.append(f"{name}={spec['repo']}@{_commit(spec['repo'], spec.get('revision'), probe)}")
    for name, spec in pickle_weights.pickle_parts(preset).items():  # what the conversion read
        words.append(f"{name}.pickle_sha256={spec.get('sha256')}")
    return " ".join(w for w in words if w)


def _dtype_kwarg() -> str:
    # Newer diffusers renamed from_pretrained's `torch_dtype` to `dtype` (and warn on the old name).
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _safetensors_file(name: str, label: str) -> str:
    if not name.endswith(".safetensors"):
        raise UserError(
            f"model {label}: {name} is not a safetensors file; fewstep refuses pickle (.bin/.pt/.ckpt) "
            "weights (convert it to safetensors and point the preset at that file)"
        )
    return name


def _load_error(e: Exception, label: str) -> UserError:
    text = str(e)
    lowered = text.lower()
    offline = ("offline", "cannot find the requested files", "connect", "local cache", "not fully cached")
    if any(s in lowered for s in offline):
        return UserError(f"model {label} is not in the local Hugging Face cache and the hub is unreachable")
    if "safetensors" in lowered:  # use_safetensors=True found only pickle weights
        return UserError(f"model {label}: no safetensors weights found; fewstep refuses pickle weights")
    first = text.splitlines()[0] if text else type(e).__name__
    return UserError(f"cannot load model {label}: {first}")


def _from_pretrained(cls, location: str, label: str, **kwargs):
    try:
        # use_safetensors=True refuses pickle weights; no custom_pipeline, no remote code.
        return cls.from_pretrained(location, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(e, label) from None


def _downloader(spec: dict[str, Any], label: str):
    """A function fetching one file of the component's repository at its pinned revision."""
    from huggingface_hub import hf_hub_download

    def download(filename: str) -> str:
        try:
            return hf_hub_download(spec["repo"], filename, revision=spec.get("revision"))
        except (OSError, ValueError) as e:
            raise _load_error(e, label) from None

    return download


def _source(spec: dict[str, Any]) -> dict[str, str]:
    return {k: spec[k] for k in ("revision", "variant", "subfolder") if spec.get(k)}


def _checkpoint(cls, name: str, spec: dict[str, Any], preset: dict[str, Any], label: str):
    """A bare checkpoint file loaded into the base repository's ``name`` architecture."""
    from accelerate import init_empty_weights
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    pickled = name in pickle_weights.pickle_parts(preset)
    filename = spec["file"] if pickled else _safetensors_file(spec["file"], label)
    try:
        revision = preset.get("revision")
        config = cls.load_config(preset["repo"], subfolder=name, **_source({"revision": revision}))
        if not pickled:
            path = hf_hub_download(spec["repo"], filename, revision=spec.get("revision"))
    except (OSError, ValueError) as e:
        raise _load_error(e, label) from None
    if pickled:  # the safetensors conversion loads, never the pickle
        path = pickle_weights.convert(spec, label, _downloader(spec, label))
    with init_empty_weights():  # no throw-away random init of a multi-GB model
        model = cls.from_config(config)
    state = load_file(path)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:
        raise UserError(f"model {label}: {filename} does not fit the {name} of {preset['repo']}") from None
    return model.eval()


def build_pipeline(preset: dict[str, Any], location: str, torch_dtype) -> Any:
    """The preset's pipeline on the CPU: components, pipeline, fused LoRA (its sampler comes after)."""
    import diffusers

    label = preset["name"]
    pickle_weights.check_convertible(preset)  # before any download: no opt-in, no conversion
    kwargs: dict[str, Any] = {_dtype_kwarg(): torch_dtype}
    if preset["kind"] != "local" and not preset["repo"].startswith("builtin:"):
        kwargs.update(_source({"revision": preset.get("revision"), "variant": preset.get("variant")}))
    pickled = pickle_weights.pickle_parts(preset)
    for name, spec in (preset.get("components") or {}).items():
        cls = _diffusers_class(spec["class"], "component")
        if name in pickled and "file" not in spec:  # a model folder whose weights are a pickle
            folder = pickle_weights.convert(spec, label, _downloader(spec, label)).parent
            kwargs[name] = _from_pretrained(cls, str(folder), label, **{_dtype_kwarg(): torch_dtype})
        elif "file" in spec:
            kwargs[name] = _checkpoint(cls, name, spec, preset, label).to(torch_dtype)
        else:
            # A scheduler (PixArt-DMD ships its own) has no weights, so no dtype.
            weights = {} if issubclass(cls, diffusers.SchedulerMixin) else {_dtype_kwarg(): torch_dtype}
            kwargs[name] = _from_pretrained(cls, spec["repo"], label, **_source(spec), **weights)
    pipeline_cls = _diffusers_class(preset.get("pipeline", "DiffusionPipeline"), "pipeline")
    pipe = _from_pretrained(pipeline_cls, location, label, **kwargs)
    lora = preset.get("lora")
    if lora:
        try:
            pipe.load_lora_weights(
                lora["repo"],
                weight_name=_safetensors_file(lora["file"], label),
                use_safetensors=True,
                **_source(lora),
            )
        except (OSError, ValueError) as e:
            raise _load_error(e, label) from None
        pipe.fuse_lora(lora_scale=float(lora.get("scale", 1.0)))
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    return pipe


def _token_counter(pipe: Any, preset: dict[str, Any]) -> TokenCounter | None:
    """Counting for the pipeline's (first) tokenizer, cut where the preset says the pipeline cuts."""
    if getattr(pipe, "tokenizer", None) is None:
        return None
    return TokenCounter(
        pipe.tokenizer,
        preset.get("token_limit"),
        preset.get("max_sequence_length"),
        preset.get("prompt_template"),
    )


def load_model(name: str, device: str = "auto") -> Model:
    """Load ``name`` (preset, hub id or directory) once, ready to generate on ``device``."""
    import diffusers

    preset = resolve_model(name)
    if preset.get("repo") == "builtin:synthetic":  # benchmarks only: no weights, no device
        return synthetic.load(name, preset, "cpu")
    device = resolve_device(device)
    torch_dtype, dtype = _torch_dtype(preset.get("dtype", "float32"), device)
    start = time.perf_counter()
    diffusers.utils.logging.set_verbosity_error()  # its truncation warning would log prompts

    location = preset["repo"]
    if location in ("builtin:tiny", "builtin:tiny-controlnet"):
        from worker import tiny

        location = str(tiny.ensure(preset["revision"], location.removeprefix("builtin:")))
    pipe = build_pipeline(preset, location, torch_dtype)
    safety = None
    if getattr(pipe, "safety_checker", None) is not None:
        safety = (pipe.safety_checker.to(device, torch_dtype), pipe.feature_extractor)
        pipe.safety_checker = None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    model = Model(
        name=name,
        preset=preset,
        pipeline=pipe,
        device=device,
        dtype=dtype,
        revision=_revision(preset),
        sampler=type(pipe.scheduler).__name__,
        scheduler_config=pipe.scheduler.config,
        safety=safety,
        # Copied now, while this is the only thread: the pipeline's tokenizer stays its own.
        tokens=_token_counter(pipe, preset),
    )
    model.use_sampler(preset.get("sampler"))
    model.load_seconds = time.perf_counter() - start
    log.info(
        "loaded model %s (revision %s) on %s as %s in %.1fs",
        name,
        model.revision,
        device,
        dtype,
        model.load_seconds,
    )
    return model
