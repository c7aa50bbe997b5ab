"""Installing fewstep: the pinned set (constraints/, written by scripts/lock.sh) covers
pyproject.toml and is what this environment runs; a producer-only install (`pip install fewstep`,
no extra) runs the producer's commands without torch, and its `worker` names the extra to add."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from fewstep.storage import open_store
from tests.conftest import REPO
from tests.support import start_worker

LOCK = REPO / "constraints" / "lock.txt"
LOCK_NO_TORCH = REPO / "constraints" / "lock-no-torch.txt"
SAMPLE = REPO / "examples" / "parti-sample.tsv"
MODEL_STACK = ["torch", "diffusers", "transformers", "accelerate", "peft", "cv2"]


def pins(path: Path) -> dict[str, tuple[Version, str | None]]:
    """name -> (pinned version, environment marker or None), read as pip reads the file."""
    found = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            req = Requirement(spec)
            (pin,) = req.specifier
            found[canonicalize_name(req.name)] = (
                Version(pin.version),
                str(req.marker) if req.marker else None,
            )
    return found


def test_every_requirement_of_pyproject_is_pinned_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    locked = pins(LOCK)
    outside = {}
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name not in locked or locked[name][0] not in req.specifier:
            outside[text] = str(locked.get(name, ("not pinned",))[0])
    assert not outside, f"pyproject.toml changed since the lock: run bash scripts/lock.sh ({outside})"


def test_this_environment_runs_the_locked_versions():
    drifted = {}
    for name, (pinned, marker) in pins(LOCK).items():
        if marker and not Marker(marker).evaluate():
            continue
        try:
            have = Version(version(name))
        except PackageNotFoundError:  # an extra this environment does not install ([hps])
            continue
        if have.public != pinned.public:  # torch 2.13.0+cpu is the lock's 2.13.0
            drifted[name] = (str(have), str(pinned))
    assert not drifted, f"installed != locked (rm .venv/.fewstep-installed; bash scripts/setup.sh): {drifted}"


def test_the_lock_for_hosts_with_their_own_torch_pins_no_torch_and_nothing_else_differently():
    full, own_torch = pins(LOCK), pins(LOCK_NO_TORCH)
    assert not {n for n in own_torch if n in {"torch", "torchvision", "triton"} or n.startswith("nvidia-")}
    assert {n: full[n] for n in own_torch} == own_torch
    # Only torch and what it alone needs are left out: everything the other packages need stays.
    assert {"torch", "triton"} <= set(full)
    assert {"numpy", "diffusers", "networkx"} <= set(own_torch)


def test_the_gpu_hosts_carried_wheels_are_the_locked_versions_of_what_it_lacks():
    """bench/device/fetch_wheels.sh fetches under the lock (pip refuses a differing pin): what the
    host already has (host-packages.txt) follows the host's own stack instead."""
    device = REPO / "bench" / "device"
    host = set(pins(device / "host-packages.txt"))
    locked = pins(LOCK_NO_TORCH)
    carried = {}
    for line in (device / "wheels.txt").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            req = Requirement(words[0])
            carried[canonicalize_name(req.name)] = Version(next(iter(req.specifier)).version)
    lacking = {name: pin for name, pin in carried.items() if name not in host}
    assert "diffusers" in lacking and "celery" in lacking
    assert {name: pin for name, pin in lacking.items() if locked[name][0] != pin} == {}


def _producer_only_venv(tmp_path: Path) -> Path:
    """A virtualenv with `pip install -c constraints/lock.txt fewstep`: the package's files only
    (as the Dockerfile copies them), no extra."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(REPO / name, source / name)
    for name in ["config", "fewstep", "producer", "worker"]:
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(LOCK), str(source)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_a_producer_only_install_runs_the_producer_and_its_worker_names_the_extra(env, output, tmp_path):
    venv = _producer_only_venv(tmp_path)
    bin_dir = venv / "bin"
    probe = f"import importlib.util as u; print([m for m in {MODEL_STACK} if u.find_spec(m)])"
    present = subprocess.run([bin_dir / "python", "-c", probe], capture_output=True, text=True, check=True)
    assert present.stdout.strip() == "[]"
    # The venv's own commands, from outside the checkout: nothing is imported from the repository.
    venv_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}

    def run(tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [bin_dir / tool, *args], env=venv_env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )

    job = "p" + uuid.uuid4().hex[:6]
    enqueue = ["enqueue", "partiprompts", "--path", str(SAMPLE), "--model", "synthetic", "--allow-synthetic",
               "--job", job, "--output", output, "--limit", "6", "--shard-size", "3", "--json"]  # fmt: skip
    dry = run("producer", *enqueue, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert (json.loads(dry.stdout)["prompts"], json.loads(dry.stdout)["shards"]) == (6, 2)
    real = run("producer", *enqueue)
    assert real.returncode == 0, real.stderr
    # A worker of the full environment does the work; the producer-only host follows and finalizes.
    worker = start_worker(env, "--exit-when-idle", "2", log_path=tmp_path / "worker.log", model="synthetic")
    try:
        assert worker.wait(timeout=300) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        worker.kill()
    status = run("producer", "status", job, "--output", output, "--json")
    assert status.returncode == 0, status.stderr
    s = json.loads(status.stdout)
    assert (s["state"], s["shards_done"], s["shards_total"]) == ("done", 2, 2), s
    finalize = run("producer", "finalize", job, "--output", output)
    assert finalize.returncode == 0, finalize.stderr
    store = open_store(json.loads(real.stdout)["job_url"])
    metadata = pq.read_table(io.BytesIO(store.get("metadata.parquet")))
    assert sorted(metadata.column("prompt").to_pylist()) == sorted(
        line.split("\t")[0] for line in SAMPLE.read_text().splitlines()[1:7]
    )

    worker_cli = run("worker", "--model", "tiny", "--device", "cpu")
    assert worker_cli.returncode != 0
    assert worker_cli.stdout == "" and "Traceback" not in worker_cli.stderr
    (line,) = worker_cli.stderr.splitlines()
    assert re.fullmatch(
        r"error: the worker needs its model stack \(torch, .*\): pip install 'fewstep\[worker\]'", line
    )
