"""The tiny preset: built deterministically in the hub layout, loaded via from_pretrained."""

from __future__ import annotations

import hashlib

import numpy as np

from worker import tiny
from worker.model import load_model


def digest(directory) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_tiny_is_built_deterministically_in_the_hub_layout(tmp_path):
    tiny.build(tmp_path / "a")
    tiny.build(tmp_path / "b")
    files = digest(tmp_path / "a")
    assert files == digest(tmp_path / "b")
    assert "model_index.json" in files
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert "text_encoder/model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files)


def test_tiny_loads_through_from_pretrained_and_is_seed_deterministic(env):
    model = load_model("tiny", "cpu")
    assert type(model.pipeline).__name__ == "StableDiffusionPipeline"
    assert type(model.pipeline.vae).__name__ == "AutoencoderTiny"
    assert type(model.pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert model.pipeline.scheduler.config.timestep_spacing == "trailing"
    kwargs = {"steps": 1, "guidance": 0.0, "width": 128, "height": 128}
    a = model.generate(["a red cube", "a blue ball"], [1, 2], **kwargs)
    b = model.generate(["a red cube", "a blue ball"], [1, 2], **kwargs)
    assert a.images.shape == (2, 128, 128, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images[0], a.images[1])
    c = model.generate(["a red cube", "a blue ball"], [1, 3], **kwargs)
    assert np.array_equal(a.images[0], c.images[0]) and not np.array_equal(a.images[1], c.images[1])
