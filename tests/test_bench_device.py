"""bench/device: the real-size configs build the published architectures (counted on the meta
device: no memory, no download), and ``run.sh --smoke`` runs every part of the device run
(GPU tests, model-only, end to end through a real worker, scoring, read-ahead off, speed
options) with the configs' tiny stand-ins on the CPU, so the script cannot rot before a GPU
hour; it leaves exactly the four files a GPU host brings back, and ends by itself at its
deadline. The rehearsal on a copy of the GPU host's Python (``rehearse.sh``) is marked slow."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

DEVICE = REPO / "bench" / "device"
RESULT_FILES = ["gpu-tests.log", "logs.tar.gz", "results.json", "summary.txt"]


def _module(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


models = _module("bench_device_models", DEVICE / "models.py")
choose_wheels = _module("bench_device_choose_wheels", DEVICE / "choose_wheels.py")

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


def run_sh(results, *args, seconds: int = 900, timeout: int = 960, script: str = "run.sh"):
    env = {**os.environ, "PYTHON": sys.executable, "FEWSTEP_DEVICE_SECONDS": str(seconds)}
    env.pop("FEWSTEP_CONFIG_DIR", None)  # run.sh points it at the checkout's config/
    env.pop("FEWSTEP_DEVICE_STARTED", None)
    return subprocess.run(["bash", str(DEVICE / script), str(results), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.slow  # a whole smoke run (about 100 s of CPU): beside the rehearsal, in the slow pass
def test_smoke_run_measures_every_part_through_a_real_worker(tmp_path):
    results = tmp_path / "results"
    # A long wall here: the CI machine is shared; the deadline has its own test below.
    done = run_sh(results, "--smoke", "--models", "sdxs-512")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert sorted(os.listdir(results)) == RESULT_FILES  # a GPU host brings back at most 8 files
    record = json.loads((results / "results.json").read_text())
    assert record["mode"].startswith("smoke") and record["machine"]["gpu"] is None
    assert "stopped" not in record and record["commit"]
    tests = record["gpu_tests"]
    assert tests["exit_code"] == 0 and tests["failures"] == tests["errors"] == 0
    assert tests["tests"] == tests["skipped"] >= 7  # on a CPU every GPU test skips, with its reason
    assert any("needs a CUDA GPU" in line for line in tests["tail"])
    assert "needs a CUDA GPU" in (results / "gpu-tests.log").read_text()
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
        assert job["bytes_per_image"] > 0 and job["rows"] == job["images"]
        assert job["storage"].startswith("local directory") and job["format"]["name"] == job["job"]
    # The benchmark's own model was gone before the worker needed the device.
    assert on["benchmark_process_held_at_worker_start"]["models"] == 0
    assert on["worker_life"]["images"] == 8 + 8 + 4 + 4  # the warm-up job's shard, then the three jobs
    assert on["worker_life"]["cpu_ms_per_image"] > 0
    scoring = sdxs["scoring"]
    assert set(scoring["sets"]) == {"clip", "clip+aesthetic+nsfw", "clip+aesthetic+nsfw+embeddings"}
    assert all(s["score_ms_per_image"] > 0 for s in scoring["sets"].values())
    options = {row["option"]: row for row in sdxs["speed_options"]}
    assert "skipped" in options["--compile default"]
    assert not any("attention" in label for label in options)  # it repeated the baseline
    assert all(row["images_per_s"] > 0 for label, row in options.items() if label != "--compile default")
    assert sdxs["deleted"] and not os.path.exists(sdxs["directory"])
    parts = [p["part"] for p in record["parts"]]
    assert parts == ["gpu tests", "sdxs-512: build", "sdxs-512: model-only", "sdxs-512: end to end",
                     "sdxs-512: scoring", "sdxs-512: read-ahead off", "sdxs-512: speed options"]  # fmt: skip
    assert all(p["outcome"] == "done" and p["seconds"] >= 0 for p in record["parts"])
    with tarfile.open(results / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {
        "sdxs-512-read-ahead-on.log",
        "sdxs-512-read-ahead-off.log",
        "gpu-tests.xml",
        "scoring.log",
    } <= names
    summary = (results / "summary.txt").read_text()
    assert "end to end, jpeg, read-ahead off" in summary
    assert "storage: local directory" in summary.splitlines()[-1]  # the goal line says where images went


def test_smoke_run_ends_by_itself_at_its_deadline_with_its_results_saved(tmp_path):
    results = tmp_path / "results"
    start = time.monotonic()
    done = run_sh(results, "--smoke", "--models", "sdxs-512", seconds=90, timeout=180)
    took = time.monotonic() - start
    assert took < 90 + 3, (took, done.stderr[-2000:])  # counted from run.sh's start, install included
    assert sorted(os.listdir(results)) == RESULT_FILES, done.stderr[-2000:]
    record = json.loads((results / "results.json").read_text())
    # Stopped by its watchdog, or the plan skipped a part that would not end before the deadline
    # (which parts depends on the machine's speed: the whole model on a slow one, a later part of it
    # on a fast one).
    stopped = record.get("stopped", "").startswith("deadline")
    skipped = [p["part"] for p in record.get("parts", []) if p.get("outcome") == "skipped: global deadline"]
    skipped += ["sdxs-512"] if record["models"]["sdxs-512"].get("skipped") == "global deadline" else []
    assert stopped or skipped, record
    # Every part that ran ended before the deadline (which parts fit depends on the machine: on a
    # fast one the speed options fit after a skipped end-to-end part, on a slow one nothing does).
    ran = [p for p in record.get("parts", []) if p.get("outcome") == "done"]
    assert all(p["started_at_s"] + p["seconds"] < 90 for p in ran), record["parts"]


def test_watchdog_saves_the_results_and_ends_the_run_at_the_deadline(tmp_path):
    results = tmp_path / "results"
    # run.sh "started" 530 s ago: the watchdog (15 s before the 540 s wall) is due at once.
    env = {**os.environ, "FEWSTEP_DEVICE_SECONDS": "540", "FEWSTEP_DEVICE_STARTED": str(time.time() - 530)}
    env.pop("FEWSTEP_CONFIG_DIR", None)
    command = [sys.executable, str(DEVICE / "run.py"), str(results), "--smoke"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-2000:]
    assert sorted(os.listdir(results)) == RESULT_FILES
    record = json.loads((results / "results.json").read_text())
    assert record["stopped"].startswith("deadline: 525 s after run.sh started"), record
    assert "STOPPED: deadline" in (results / "summary.txt").read_text()


def test_stopping_kills_every_process_the_run_started():
    # A child with a grandchild, as run.py has a worker or pytest with their own children.
    script = (
        "import subprocess, run; "
        "child = subprocess.Popen(['bash', '-c', 'sleep 300 & echo $!; wait'], stdout=-1, text=True); "
        "grandchild = child.stdout.readline().strip(); run._kill_children(); "
        "print(child.wait(timeout=30), grandchild)"
    )
    env = {**os.environ, "PYTHONPATH": f"{DEVICE}:{REPO}"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    code, grandchild = done.stdout.split()
    assert code == "-9"
    time.sleep(1)  # the orphaned grandchild, if killed, is reaped by init
    stat = Path(f"/proc/{grandchild}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_wheels_are_chosen_only_where_the_host_lacks_them_or_has_them_too_old(tmp_path):
    listed = tmp_path / "wheels.txt"
    listed.write_text(
        "# comment\n"
        "pytest==9.2.0      8.0\n"  # here, new enough: the host's copy stays
        "pluggy==1.7.0      99.0  with pytest\n"  # too old, but only considered with pytest
        "click==8.5.1       99.0\n"  # here, too old
        "fewstep-absent==1.0  1.0\n"  # missing
        "six==1.17.0        0     with fewstep-absent\n"  # considered with it: here already
        "mdurl==0.1.2       99.0  with fewstep-absent\n"  # considered with it: too old
    )
    assert choose_wheels.choose(str(listed)) == ["click==8.5.1", "fewstep-absent==1.0", "mdurl==0.1.2"]


def test_the_carried_list_never_shadows_the_hosts_own_stack():
    pins = {
        pin.split("==")[0].lower().replace("_", "-")
        for pin, _, _ in choose_wheels.rows(str(DEVICE / "wheels.txt"))
    }
    assert "tzdata" in pins  # kombu needs a time-zone database at import
    assert not pins & {"torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy"}
    assert not pins & {"importlib-metadata", "zipp"}  # not needed on 3.12; 10.x needs lazy-importer
    hub = next(
        row for row in choose_wheels.rows(str(DEVICE / "wheels.txt")) if row[0].startswith("huggingface")
    )
    assert hub[0].split("==")[1].startswith("1.")  # transformers 5.17 needs huggingface_hub < 2


def test_commit_is_said_without_git_on_the_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(DEVICE))  # run.py imports its neighbours, as a script does
    run = _module("bench_device_run", DEVICE / "run.py")
    monkeypatch.delenv("FEWSTEP_COMMIT", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git
    assert run._commit().startswith("unknown (no git here")
    monkeypatch.setenv("FEWSTEP_COMMIT", "abc1234")
    assert run._commit() == "abc1234"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # its own bound is run_sh's 1,500 s
def test_rehearsal_on_the_gpu_hosts_python_with_no_tzdata_and_no_git(tmp_path):
    """rehearse.sh: CPython 3.12 with only the host's packages (torch 2.11's CUDA build on the CPU),
    no time-zone database, no git; run.sh installs the carried wheels and runs the smoke."""
    results = tmp_path / "results"
    done = run_sh(results, "--smoke", "--models", "sdxs-512", script="rehearse.sh", timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run.sh: installed" in done.stdout and "tzdata" in done.stdout
    assert sorted(os.listdir(results)) == RESULT_FILES
    record = json.loads((results / "results.json").read_text())
    assert record["machine"]["python"].startswith("3.12.") and record["machine"]["torch"].startswith("2.11.0")
    assert record["commit"].startswith("unknown (no git here")
    sdxs = record["models"]["sdxs-512"]
    assert "error" not in sdxs and sdxs["end_to_end"][0]["jobs"][0]["images_per_s"] > 0
    assert all(p["outcome"] == "done" for p in record["parts"]), record["parts"]
