"""InstaFlow: one-step text-to-image by rectified flow, sampled in-project.

InstaFlow-0.9B (``XCLiu/instaflow_0_9B_from_sd_1_5``) is an SD 1.5-shaped UNet trained to
predict the velocity of a straight flow from noise to image latents. Its repository names a
``RectifiedFlowPipeline`` that diffusers does not ship: the authors load it as community code
(``pipeline_rf.py`` in gnobitab/InstaFlow), which fewstep never runs. The sampler is a few
lines, so it lives here instead, on top of diffusers' Stable Diffusion pipeline for everything
that is not the sampler (CLIP prompt encoding, VAE decoding, image post-processing) and
loading the repository's own UNet, VAE, text encoder and tokenizer as safetensors.

The authors' sampler (``pipeline_rf.py``, ``__call__``): the latents start as standard
normal noise; step ``i`` of ``N`` asks the UNet for the velocity at ``t = (1 - i/N) * 1000``
and takes an Euler step ``latents += v / N``; the VAE decodes ``latents / scaling_factor``.
InstaFlow-0.9B runs it with ``N = 1``: one velocity prediction at ``t = 1000`` and one Euler
step of size 1, from noise straight to the image latents. Guidance above 1 runs the
classifier-free guidance of that file (InstaFlow-0.9B's card allows only 0).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

#: Time runs from noise (1000) to data (0) in the authors' parametrisation.
T_NOISE = 1000.0


def flow_timesteps(steps: int) -> list[float]:
    """The authors' schedule: ``steps`` equal Euler steps from t = 1000 towards 0."""
    return [(1.0 - i / steps) * T_NOISE for i in range(steps)]


def euler_step_sizes(timesteps: list[float]) -> list[float]:
    """The size of each Euler step (in units of the whole flow): down to the next time, the
    last one down to 0; ``[1000]`` gives one step of size 1, the authors' schedule ``1/N`` each."""
    ends = [*timesteps[1:], 0.0]
    return [(t - end) / T_NOISE for t, end in zip(timesteps, ends, strict=True)]


class InstaFlowPipeline(StableDiffusionPipeline):
    """Stable Diffusion's components and prompt encoding, InstaFlow's rectified-flow sampler.

    Loaded with ``from_pretrained`` like any diffusers pipeline (the class given explicitly, so
    the repository's ``RectifiedFlowPipeline`` name is never resolved to code). The scheduler the
    repository ships is loaded but not used: the flow needs no noise schedule.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        width: int | None = None,
        height: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        timesteps: list[float] | None = None,
        negative_prompt: str | list[str] | None = None,
        return_dict: bool = True,
        **ignored: Any,
    ):
        """Images for ``prompt`` in ``num_inference_steps`` Euler steps (or at ``timesteps``)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"width and height must be multiples of {self.vae_scale_factor}")
        device = self._execution_device
        cfg = guidance_scale > 1.0
        embeds, negative = self.encode_prompt(prompts, device, 1, cfg, negative_prompt)
        if cfg:
            embeds = torch.cat([negative, embeds])

        times = list(timesteps) if timesteps is not None else flow_timesteps(num_inference_steps)
        shape = (
            len(prompts),
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        # Standard normal noise, the flow's source distribution (no scheduler sigma scaling).
        latents = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
        for t, dt in zip(times, euler_step_sizes(times), strict=True):
            model_input = torch.cat([latents] * 2) if cfg else latents
            t_vector = torch.full((model_input.shape[0],), t, device=device)
            velocity = self.unet(model_input, t_vector, encoder_hidden_states=embeds).sample
            if cfg:
                unconditional, conditional = velocity.chunk(2)
                velocity = unconditional + guidance_scale * (conditional - unconditional)
            latents = latents + dt * velocity

        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, None
        # The worker runs the safety checker itself, beside the pipeline (see worker/model.py).
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
