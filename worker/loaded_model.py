"""A loaded model and the batches it makes: what the device thread calls.

:class:`Model` is a pinned pipeline with its samplers, its img2img twin and its safety
checker; :class:`Batch` is one call's images. Both loaders build one: the preset loader
(:mod:`worker.model`) and the benchmarks' stand-in (:mod:`worker.synthetic`), which each
import this module, never each other.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fewstep import UserError
from fewstep.presets import check_generation, sampler_spec
from worker.batching import out_of_memory_failpoint


@dataclass
class Batch:
    """What one pipeline call produced."""

    images: np.ndarray  # (N, H, W, 3) uint8 (a device tensor with keep_on_device)
    nsfw: list[bool | None]
    seconds: float


class TokenCounter:
    """Prompt token counts for any thread but the device thread, which owns the pipeline.

    transformers 5's Rust-backed tokenizers keep padding and truncation as state of the
    backend object, set by every call: the pipeline's tokenizer, called by the device thread
    with ``padding="max_length", truncation=True``, gives a thread counting with it at the
    same moment wrong counts (the other call's padding or truncation) and the pipeline
    "Unable to create tensor" or over-long inputs. Each counting thread therefore gets a deep
    copy of its own (a new Rust backend, not a shared one), copied from a template taken at
    load time, before any thread runs the pipeline, and never called itself.

    A count is every token the tokenizer makes of the prompt, its begin and end tokens
    included (CLIP adds both, T5 only the end token, Gemma only the begin token); ``limit`` is
    the tokenizer's ``model_max_length``, which counts them the same way, so a prompt is cut
    exactly when its count exceeds the limit.

    Pipelines that cut at their own sequence length instead say where, in the preset:
    ``token_limit``, the cut counted as a count counts (SANA, Z-Image, PixArt: worked out per
    pipeline, whose prefixes and templates shift the cut), or else ``max_sequence_length`` with
    ``prompt_template`` (FLUX.2 klein, Qwen-Image: the limit is the tokens that fit beside the
    template's own; "chat" for the tokenizer's chat template, else a format string with ``{}``,
    the part of the pipeline's template within its cut).
    """

    def __init__(
        self,
        tokenizer: Any,
        limit: int | None = None,
        max_length: int | None = None,
        prompt_template: str | None = None,
    ):
        self._template = copy.deepcopy(tokenizer)
        self.limit = int(tokenizer.model_max_length)
        if limit is not None:
            self.limit = int(limit)
        elif max_length is not None:
            self.limit = int(max_length) - self._template_tokens(prompt_template)
        self._local = threading.local()
        self._copying = threading.Lock()

    def _template_tokens(self, prompt_template: str | None) -> int:
        """Tokens the pipeline's prompt template adds (counted on the copy: no thread runs yet)."""
        if prompt_template is None:
            return 0
        wrapped = wrap_prompt(self._template, prompt_template, "")
        return len(self._template(wrapped)["input_ids"]) - len(self._template("")["input_ids"])

    def _tokenizer(self) -> Any:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            with self._copying:  # the template is only read, but one copy at a time costs nothing
                tokenizer = self._local.tokenizer = copy.deepcopy(self._template)
        return tokenizer

    def count(self, prompts: list[str]) -> list[int]:
        """Each prompt's token count, untruncated, begin and end tokens included."""
        ids = self._tokenizer()(list(prompts), truncation=False, add_special_tokens=True)["input_ids"]
        return [len(i) for i in ids]


def wrap_prompt(tokenizer: Any, template: str, prompt: str) -> str:
    """``prompt`` as a pipeline with an LLM text encoder hands it to its tokenizer: in the
    tokenizer's chat template ("chat": one user turn, the assistant's turn opened, thinking
    off, as FLUX.2 klein and Z-Image do) or in a format string (``{}``: the prompt)."""
    if template == "chat":
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
    return template.format(prompt)


@dataclass
class Model:
    """A pinned, loaded model.

    Only the device thread uses ``pipeline`` (and so its tokenizers); other threads count
    tokens through ``tokens``, which gives each its own tokenizer.
    """

    name: str
    preset: dict[str, Any]
    pipeline: Any
    device: str
    dtype: str
    revision: str | None
    sampler: str
    load_seconds: float = 0.0
    #: The repository's own scheduler config: every sampler is derived from it.
    scheduler_config: Any = None
    #: (safety checker, feature extractor), taken out of the pipeline so that it only flags.
    safety: tuple[Any, Any] | None = None
    #: Token counting off the device thread (None: the pipeline has no tokenizer).
    tokens: TokenCounter | None = None
    #: The img2img pipeline sharing ``pipeline``'s components, made on first use (:meth:`img2img`).
    _img2img: Any = None

    def use_sampler(self, label: str | None) -> None:
        """Switch to one of the preset's samplers (None: keep the current one)."""
        if label is None or label == self.sampler:
            return
        self.pipeline.scheduler = _scheduler(self.scheduler_config, sampler_spec(self.preset, label))
        self.sampler = label

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
        images: list | None = None,
        strength: float | None = None,
        control_images: list | None = None,
        controlnet_scale: float | None = None,
    ) -> Batch:
        """Images for ``prompts``, image i from ``seeds[i]`` (CPU generators: device-independent noise).

        With ``keep_on_device`` the images stay a uint8 tensor on the model's device, so the
        encode stage can copy them asynchronously or encode them there.

        Conditioned batches: ``images`` (one RGB image per prompt, at width x height) with
        ``strength`` run the preset's img2img pipeline (``--condition init``); ``control_images``
        with ``controlnet_scale`` are a ControlNet preset's maps. Without them a preset with an
        img2img table still runs text-to-image; a ControlNet preset refuses.
        """
        import torch

        out_of_memory_failpoint(len(prompts))
        # Fixed timesteps: diffusers would run them whatever `steps` says, and the metadata lie.
        check_generation(self.preset, {"steps": steps})
        pipeline, kwargs = self._conditioned_call(images, strength, control_images, controlnet_scale)
        kwargs.update(self.preset.get("call") or {})
        # Arguments the pipeline accepts only at some step counts (TOML has no null to say so).
        for arg, at_steps in (self.preset.get("call_none_unless_steps") or {}).items():
            if steps not in at_steps:
                kwargs[arg] = None
        if self.preset.get("timesteps"):
            kwargs["timesteps"] = list(self.preset["timesteps"])
        if self.preset.get("max_sequence_length"):  # where the pipeline cuts the prompt, as counted
            kwargs["max_sequence_length"] = int(self.preset["max_sequence_length"])
        # Pipelines with true CFG (Qwen-Image) take the scale as `true_cfg_scale`; their
        # `guidance_scale` feeds a guidance embedding the model may not have.
        kwargs[self.preset.get("guidance_argument", "guidance_scale")] = guidance
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        if pipeline is self.pipeline or _accepts(pipeline, "width"):  # SD img2img: the image's size
            kwargs.update(width=width, height=height)
        start = time.perf_counter()
        vae = getattr(pipeline, "vae", None)
        vae_dtype = getattr(vae, "dtype", None)
        with torch.inference_mode():
            try:
                out = pipeline(
                    prompt=list(prompts),
                    num_inference_steps=steps,
                    generator=generators,
                    output_type="pt",
                    **kwargs,
                )
            finally:
                # SDXL pipelines upcast a float16 VAE (force_upcast) to float32 to decode and cast
                # it back after: an error in the decode (out of memory) would leave it float32, and
                # every later call fail on float16 latents ("Input type (c10::Half) and bias type
                # (float) should be the same"), the smaller retries too.
                if vae is not None and vae.dtype != vae_dtype:
                    vae.to(dtype=vae_dtype)
            pixels = out.images
            if pixels.ndim == 4 and pixels.shape[1] in (1, 3):
                pixels = pixels.permute(0, 2, 3, 1)
            images = (pixels.float() * 255).round().clamp(0, 255).to(torch.uint8)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)  # so `seconds` is the device's time, not launch time
            if not keep_on_device:
                images = images.cpu().numpy()
            nsfw = self._nsfw(images)  # on the host copy when there is one: one copy, not two
        seconds = time.perf_counter() - start
        return Batch(images=images, nsfw=nsfw, seconds=seconds)

    def _conditioned_call(
        self,
        images: list | None,
        strength: float | None,
        control_images: list | None,
        controlnet_scale: float | None,
    ) -> tuple[Any, dict[str, Any]]:
        """The pipeline to call for a batch and its conditioning arguments."""
        control = self.preset.get("control")
        if control:
            if control_images is None:
                raise UserError(f"model {self.name} is a ControlNet preset: every image needs a control map")
            scale = float(control.get("scale", 1.0)) if controlnet_scale is None else controlnet_scale
            return self.pipeline, {"image": list(control_images), "controlnet_conditioning_scale": scale}
        if control_images is not None:
            raise UserError(f"model {self.name} has no ControlNet: it cannot take control maps")
        if images is None:
            return self.pipeline, {}
        table = self.preset.get("img2img")
        if not table:
            raise UserError(f"model {self.name} has no img2img pipeline: it cannot start from an image")
        value = float(table["strength"]) if strength is None else strength
        return self.img2img(), {"image": list(images), "strength": value}

    def img2img(self) -> Any:
        """The preset's img2img pipeline, made once (device thread) from the loaded pipeline's
        components: the same modules, no second copy of the weights. Made again if a
        component was swapped since (``--vae``, compilation), and given the current sampler."""
        components = self.pipeline.components
        made = self._img2img
        if made is None or any(
            made.components.get(k) is not v
            for k, v in components.items()
            if k in made.components and k != "scheduler"  # the sampler is handed over below
        ):
            import inspect

            cls = _diffusers_class(self.preset["img2img"]["pipeline"], "pipeline")
            # The constructor's own parameters, filled from the loaded pipeline (diffusers'
            # from_pipe drops parts whose class differs from the annotation: a tiny VAE).
            parameters = inspect.signature(cls.__init__).parameters
            kwargs = {k: components.get(k) for k in parameters if k != "self" and k in components}
            kwargs.update({k: None for k, p in parameters.items() if k not in kwargs and p.default is None})
            if "requires_safety_checker" in parameters:
                kwargs["requires_safety_checker"] = False  # the checker runs apart (Model.safety)
            made = self._img2img = cls(**kwargs)
            made.set_progress_bar_config(disable=True)
        made.scheduler = self.pipeline.scheduler
        return made

    def probe_inputs(self, n: int, width: int, height: int) -> dict[str, Any]:
        """What a probe or warm-up batch of ``n`` needs besides prompts: black control maps for a
        ControlNet preset (it cannot run text-only), nothing otherwise."""
        if not self.preset.get("control"):
            return {}
        from PIL import Image

        return {"control_images": [Image.new("RGB", (width, height))] * n}

    def _nsfw(self, images) -> list[bool | None]:
        # The checker blanks the images it flags; it gets a copy, the real images are kept.
        if self.safety is None:
            return [None] * len(images)
        from PIL import Image

        images = np.asarray(images.cpu()) if not isinstance(images, np.ndarray) else images

        checker, extractor = self.safety
        clip = extractor([Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
        param = next(checker.parameters())
        _, flags = checker(images=images.copy(), clip_input=clip.to(param.device, param.dtype))
        return [bool(f) for f in flags]

    def count_tokens(self, prompts: list[str]) -> tuple[list[int], int]:
        """Token count of each prompt (untruncated, begin and end tokens included) and the
        text encoder's limit, counted the same way; safe from any thread (see TokenCounter)."""
        if self.tokens is None:
            return [0] * len(prompts), 0
        return self.tokens.count(prompts), self.tokens.limit


def _accepts(pipeline: Any, argument: str) -> bool:
    """Whether the pipeline's ``__call__`` takes ``argument``."""
    import inspect

    return argument in inspect.signature(type(pipeline).__call__).parameters


#: Pipelines fewstep defines itself (module, class), for models diffusers ships no pipeline for.
PROJECT_PIPELINES = {"InstaFlowPipeline": ("worker.instaflow", "InstaFlowPipeline")}


def _diffusers_class(name: str, what: str):
    """A class diffusers itself defines, or one of fewstep's own pipelines: no class name can
    pull in code from a repository."""
    import importlib

    import diffusers

    if what == "pipeline" and name in PROJECT_PIPELINES:
        module, attribute = PROJECT_PIPELINES[name]
        return getattr(importlib.import_module(module), attribute)
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained" if what != "scheduler" else "from_config"):
        raise UserError(f"preset names unknown {what} class {name!r}")
    return cls


def _scheduler(config: Any, spec: dict[str, Any]):
    """The sampler's scheduler, derived from the repository's own scheduler config.

    ``unset`` lists config keys to set to None (TOML has no null), where a card clears a
    setting the repository's config has (Qwen-Image-Lightning: ``shift_terminal``).
    """
    spec = dict(spec)
    spec.update(dict.fromkeys(spec.pop("unset", ()), None))
    cls = _diffusers_class(spec.pop("class", None) or config["_class_name"], "scheduler")
    return cls.from_config(config, **spec)
