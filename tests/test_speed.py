"""Speed options applied after loading: tiny VAE by family, precision, channels_last, SDPA,
compile wiring, and the batch size chosen by measurement. On the CPU (no GPU here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep import UserError
from tests.support import committed_metadata, config_dir, run_worker_until_done
from tests.test_end_to_end import SAMPLE, enqueue
from worker import speed, tiny
from worker.model import load_model
from worker.speed import SpeedOptions, choose_batch_size


@pytest.fixture
def tiny_vae_config(tmp_path, monkeypatch):
    """A config directory whose [tiny_vae] entries are local AutoencoderTiny replicas."""
    repos = {}
    for family in ("sd", "sdxl"):
        torch.manual_seed(1 if family == "sd" else 2)
        repos[family] = tmp_path / f"tae{family}"
        tiny.vae_tiny(8).save_pretrained(repos[family], safe_serialization=True)
    config = config_dir(tmp_path, tiny_vae={family: str(path) for family, path in repos.items()})
    monkeypatch.setenv("FEWSTEP_CONFIG_DIR", config)
    return repos


def test_tiny_vae_is_picked_by_family_and_replaces_the_decoder(env, tiny_vae_config):
    model = load_model("tiny", "cpu")
    assert speed.family(model) == "sd"
    applied = speed.apply(model, SpeedOptions(vae="tiny"))
    assert applied["vae"] == f"tiny:{tiny_vae_config['sd']}"
    vae = model.pipeline.vae
    assert type(vae).__name__ == "AutoencoderTiny" and vae.config.decoder_block_out_channels == [8, 8, 8, 8]
    batch = model.generate(["a red cube"], [1], steps=1, guidance=0.0, width=128, height=128)
    assert batch.images.shape == (1, 128, 128, 3)
    # SDXL latents need taesdxl, never taesd; other pipelines have no tiny VAE.
    model.preset = {**model.preset, "family": "sdxl"}
    assert speed.tiny_vae_repo(speed.family(model)) == str(tiny_vae_config["sdxl"])
    with pytest.raises(UserError, match="SD1/SD2"):
        speed.tiny_vae_repo("FluxPipeline")


def test_worker_with_vae_tiny_records_it_in_the_metadata(env, output, tiny_vae_config, tmp_path):
    env = {**env, "FEWSTEP_CONFIG_DIR": str(tmp_path / "config")}
    job = enqueue(SAMPLE, "tiny-vae", output, env, "--shard-size", "4", "--limit", "4")
    run_worker_until_done(env, output, "tiny-vae", args=("--vae", "tiny"), log_path=tmp_path / "worker.log")
    table = committed_metadata(job["job_url"])
    assert set(table.column("vae").to_pylist()) == {f"tiny:{tiny_vae_config['sd']}"}


def test_channels_last_sdpa_and_compile_are_applied(env):
    model = load_model("tiny", "cpu")
    applied = speed.apply(model, SpeedOptions(channels_last=True, dtype="float16"))
    unet = model.pipeline.unet
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert applied == {"channels_last": True, "attention": "sdpa"}
    assert not speed.compile_denoiser(model, "off") and unet._compiled_call_impl is None
    assert speed.compile_denoiser(model, "default")
    assert unet._compiled_call_impl is not None  # compiled lazily, during the warm-up
    assert model.dtype == "float32"  # half precision is for CUDA; the CPU stays float32


def test_batch_size_doubles_while_it_pays_and_fits():
    def saturating(n):  # throughput stops growing past 8 images per batch
        return max(n, 8) / 100

    size, measured = choose_batch_size(saturating, limit=128)
    assert size == 8 and [n for n, _ in measured] == [1, 2, 4, 8, 16]

    def runs_out_at_32(n):
        if n >= 32:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 1 / 100

    size, _ = choose_batch_size(runs_out_at_32, limit=128, out_of_memory=(torch.OutOfMemoryError,))
    assert size == 16
    assert choose_batch_size(lambda n: 1 / 100, limit=4)[0] == 4  # capped

    def never_fits(n):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(UserError, match="not even a batch of 1"):
        choose_batch_size(never_fits, limit=4, out_of_memory=(torch.OutOfMemoryError,))


def test_batch_size_is_measured_on_the_model(env):
    model = load_model("tiny", "cpu")
    size = speed.auto_batch_size(model, limit=8)
    assert size in (1, 2, 4, 8)
    warm = speed.warm_up(model, size, 1)
    assert warm > 0
    batch = model.generate(["x"] * size, list(range(size)), steps=1, guidance=0.0, width=128, height=128)
    assert batch.images.shape[0] == size and batch.images.dtype == np.uint8
