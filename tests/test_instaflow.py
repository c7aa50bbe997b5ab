"""InstaFlow-0.9B through fewstep's own rectified-flow sampler (worker/instaflow.py).

The sampler is checked against the InstaFlow authors' ``pipeline_rf.py``: pure noise in, one
velocity prediction by the UNet at t = 1000, one Euler step of size 1 (``latents + v``), the
VAE decoding ``latents / scaling_factor``. The weights are a tiny random replica of
``XCLiu/instaflow_0_9B_from_sd_1_5`` in the hub's layout (its model_index.json names the
community ``RectifiedFlowPipeline``, which must never be resolved to code).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep import UserError
from fewstep.presets import check_generation, resolve_model
from tests import replicas
from tests.replicas.hub import offline
from tests.support import committed_metadata, run_worker_until_done
from tests.test_presets import Denoiser, enqueue
from worker.instaflow import euler_step_sizes, flow_timesteps

NAME = "instaflow-0.9b"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Only InstaFlow's replica, in a hub cache this process (and its workers) reads offline."""
    root = tmp_path_factory.mktemp("hub")
    with offline(root):
        yield replicas.build(root, {NAME})


@pytest.fixture(scope="module")
def model(hub):
    from worker.model import load_model

    return load_model(NAME, "cpu")


def generate(model, prompts=("a photo of a cat", "two blue cubes"), seeds=(1, 2), width=64, height=64):
    return model.generate(list(prompts), list(seeds), steps=1, guidance=0.0, width=width, height=height)


def test_one_step_is_one_euler_step_of_size_one_from_t1000():
    assert flow_timesteps(1) == [1000.0] and euler_step_sizes([1000.0]) == [1.0]
    # The authors' N-step schedule: t = (1 - i/N) * 1000, steps of 1/N.
    assert flow_timesteps(4) == [1000.0, 750.0, 500.0, 250.0]
    assert euler_step_sizes(flow_timesteps(4)) == [0.25] * 4


def test_preset_is_one_step_without_guidance_and_refuses_more_steps():
    preset = resolve_model(NAME)
    assert (preset["steps"], preset["guidance"], preset["timesteps"]) == (1, 0.0, [1000])
    assert len(preset["revision"]) == 40 and "NON-COMMERCIAL" in preset["license"]
    with pytest.raises(UserError, match="steps must be 1"):
        check_generation(preset, {"steps": 2})


def test_loads_the_published_parts_into_fewsteps_own_pipeline(model):
    pipe = model.pipeline
    assert type(pipe).__module__ == "worker.instaflow"  # not the repository's RectifiedFlowPipeline
    assert [type(getattr(pipe, n)).__name__ for n in ("unet", "vae", "text_encoder")] == [
        "UNet2DConditionModel",
        "AutoencoderKL",
        "CLIPTextModel",
    ]
    assert model.safety is not None  # the repository's checker runs beside, as for SD 1.5
    assert model.revision == resolve_model(NAME)["revision"]


def test_one_unet_call_at_t1000_then_noise_plus_velocity_is_decoded(model):
    denoiser = Denoiser(model)
    try:
        batch = generate(model)
    finally:
        denoiser.handle.remove()
    assert (denoiser.batches, denoiser.timesteps) == ([2], [1000])

    # The authors' arithmetic, by hand: x1 = z + 1 * v(z, 1000); image = decode(x1 / scaling).
    pipe = model.pipeline
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(["a photo of a cat", "two blue cubes"], "cpu", 1, False)
        noise = torch.cat(
            [torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        )
        velocity = pipe.unet(noise, torch.full((2,), 1000.0), encoder_hidden_states=embeds).sample
        decoded = pipe.vae.decode((noise + velocity) / pipe.vae.config.scaling_factor).sample
    expected = ((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    assert np.abs(batch.images.astype(int) - expected.astype(int)).max() <= 1


def test_resolution_and_determinism_per_seed(model):
    first = generate(model, width=96, height=64)
    assert first.images.shape == (2, 64, 96, 3) and first.images.dtype == np.uint8
    again = generate(model, prompts=("two blue cubes", "a photo of a cat"), seeds=(2, 1), width=96, height=64)
    assert np.array_equal(first.images[0], again.images[1])  # same prompt and seed, another batch slot
    other = generate(model, seeds=(3, 2), width=96, height=64)
    assert not np.array_equal(first.images[0], other.images[0])


def test_a_real_worker_writes_instaflow_metadata_rows(hub, env, output, tmp_path):
    job = enqueue(env, output, "instaflow", NAME)
    run_worker_until_done(
        env, output, "instaflow", model=NAME, log_path=tmp_path / "worker.log", timeout=300, exit_timeout=120
    )
    rows = committed_metadata(job["job_url"]).to_pylist()
    assert len(rows) == 4
    for row in rows:
        assert (row["model"], row["model_revision"]) == (NAME, resolve_model(NAME)["revision"])
        assert (row["sampler"], row["step"], row["cfg"], row["width"], row["height"]) == (
            "rectified-flow-euler",
            1,
            0.0,
            64,
            64,
        )
        assert row["nsfw"] is False
