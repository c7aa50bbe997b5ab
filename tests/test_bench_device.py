"""bench/device: the real-size configs build the published architectures (counted on the meta
device: no memory, no download), and ``run.sh --smoke`` runs every part of the device run
(GPU tests, model-only, speed options, end to end through a real worker, read-ahead off)
with the configs' tiny stand-ins on the CPU, so the script cannot rot before a GPU hour."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("bench_device_models", REPO / "bench" / "device" / "models.py")
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)

# Published parameter counts of the real models (the same as tests/test_bench_gpu.py's).
REAL = {
    "sd-turbo": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl-turbo": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
    "sdxs-512": {"vae": 2_445_063, "text_encoder": 123_060_480},  # TAESD; SD 1.5's CLIP ViT-L
}


def parameters(name: str, part: str) -> int:
    with torch.device("meta"):
        module = models._component(part, models.spec(name)["components"][part], smoke=False)
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_configs_have_the_published_parameter_counts(name):
    assert {part: parameters(name, part) for part in REAL[name]} == REAL[name]


def test_pixart_config_has_the_published_sizes():
    # PixArt-α: a 0.6B DiT (paper: 0.6B parameters), T5 v1.1 XXL's encoder (4.76B), the SD VAE.
    assert 0.60e9 < parameters("pixart-alpha-512", "transformer") < 0.62e9
    assert 4.75e9 < parameters("pixart-alpha-512", "text_encoder") < 4.77e9
    assert parameters("pixart-alpha-512", "vae") == REAL["sd-turbo"]["vae"]


def test_sdxs_unet_is_sd_unet_with_blocks_removed():
    with torch.device("meta"):
        unet = models._component("unet", models.spec("sdxs-512")["components"]["unet"], smoke=False)
    assert unet.mid_block is None and len(unet.down_blocks) == 3
    assert [len(b.resnets) for b in unet.down_blocks] == [1, 1, 1]
    assert sum(p.numel() for p in unet.parameters()) < 0.5 * REAL["sd-turbo"]["unet"]


def test_smoke_run_measures_every_part_through_a_real_worker(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("FEWSTEP_CONFIG_DIR", None)  # run.sh points it at the checkout's config/
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "device" / "run.sh"), str(results), "--smoke", "--models", "sdxs-512"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads((results / "results.json").read_text())
    assert record["mode"].startswith("smoke") and record["machine"]["gpu"] is None
    tests = record["gpu_tests"]
    assert tests["exit_code"] == 0 and tests["failures"] == tests["errors"] == 0
    assert tests["tests"] == tests["skipped"] >= 7  # on a CPU every GPU test skips, with its reason
    assert any("needs a CUDA GPU" in line for line in tests["tail"])
    sdxs = record["models"]["sdxs-512"]
    assert "error" not in sdxs
    assert [(r["batch_size"], r["images_per_s"] > 0) for r in sdxs["model_only"]] == [(1, True), (2, True)]
    assert sdxs["auto_batch_size"]["chosen"] in (1, 2)
    on, off = sdxs["end_to_end"]
    assert (on["read_ahead"], off["read_ahead"]) == (True, False)
    assert [(j["job"], j["images"]) for j in on["jobs"]] == [("jpeg", 8), ("png", 4), ("webp", 4)]
    assert [(j["job"], j["images"]) for j in off["jobs"]] == [("jpeg", 8)]
    assert off["jobs"][0]["shards_started_with_batches_read_ahead"] == 0  # FEWSTEP_READ_AHEAD=0 held
    for job in on["jobs"] + off["jobs"]:
        assert job["images_per_s"] > 0 and job["ratio_to_model_only"] > 0 and job["encoder"]
    assert on["worker_life"]["images"] == 8 + 8 + 4 + 4  # the warm-up job's shard, then the three jobs
    assert on["worker_life"]["cpu_ms_per_image"] > 0
    options = {row["option"]: row for row in sdxs["speed_options"]}
    assert "skipped" in options["--compile default"]
    assert all(row["images_per_s"] > 0 for label, row in options.items() if label != "--compile default")
    summary = (results / "summary.txt").read_text()
    assert "end to end, jpeg, read-ahead off" in summary
