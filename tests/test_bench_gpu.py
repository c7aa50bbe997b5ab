"""bench/gpu.py builds the real architectures (checked by parameter count, on the meta
device: no memory, no download) and runs end to end in its CPU smoke mode."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from tests.conftest import REPO

# Published parameter counts of the real models.
REAL = {
    "sd21-vae-512": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd21-taesd-512": {"unet": 865_910_724, "vae": 2_445_063, "text_encoder": 340_387_840},
    "sdxl-vae-1024": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("setup", sorted(REAL))
def test_setups_have_the_real_architectures(gpu, setup):
    with torch.device("meta"):
        pipe = gpu.SETUPS[setup].build(False)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in REAL[setup]}
    assert counts == REAL[setup]


def test_smoke_mode_runs_and_writes_its_result(gpu, tmp_path):
    out = tmp_path / "gpu.json"
    argv = [
        "--smoke",
        "--setup",
        "sd21-taesd-512",
        "--batch-sizes",
        "1,2",
        "--min-seconds",
        "0",
        "--out",
        str(out),
    ]
    assert gpu.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["mode"].startswith("smoke") and record["machine"]["device"] == "cpu"
    assert [(r["batch_size"], r["error"]) for r in record["results"]] == [(1, None), (2, None)]
    assert all(r["images_per_s"] > 0 for r in record["results"])
