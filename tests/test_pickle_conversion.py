"""Pickle-only components load through a one-time, opt-in, sha256-checked safetensors conversion.

The replicas publish the SDXS sketch ControlNet and DMD2's 1-step UNet as pickles, as the
hub does (config/hub_files.toml). Their bytes are not the real files', so the presets' pinned
sha256s refuse them (the mismatch test); the other tests run on a copy of config/ whose
sha256s are the replicas' own (tests/replicas/pickles.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fewstep import UserError
from fewstep.presets import resolve_model
from tests import replicas
from tests.replicas.hub import offline
from tests.replicas.pickles import config_with_replica_shas, replica_pickle
from tests.support import cli
from tests.test_cli_errors import assert_one_line_error
from worker import pickle_weights

SKETCH, DMD2 = "sdxs-512-dreamshaper-sketch", "dmd2-sdxl-1step"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    with offline(root):
        yield replicas.build(root, {SKETCH, DMD2})


def pickle_path(hub, name: str) -> Path:
    return replica_pickle(hub, next(iter(pickle_weights.pickle_parts(resolve_model(name)).values())))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_MODEL_CACHE", str(tmp_path / "models"))
    monkeypatch.delenv(pickle_weights.ALLOW_ENV, raising=False)
    return tmp_path / "models"


@pytest.fixture
def replica_shas(hub, tmp_path, monkeypatch, cache):
    """config/ with the replicas' sha256s in place of the real files', and the opt-in given."""
    measured = config_with_replica_shas(hub, {SKETCH, DMD2}, tmp_path / "config")
    monkeypatch.setenv("FEWSTEP_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv(pickle_weights.ALLOW_ENV, "1")
    return measured


def test_without_the_opt_in_a_pickle_preset_is_refused_in_one_line_naming_it(hub, cache):
    from worker.model import load_model

    for name in (SKETCH, DMD2):
        with pytest.raises(UserError, match="pass --allow-pickle-conversion") as e:
            load_model(name, "cpu")
        assert "\n" not in str(e.value) and "FEWSTEP_ALLOW_PICKLE_CONVERSION=1" in str(e.value)
    assert not cache.exists()  # nothing converted


def test_worker_refuses_before_the_broker_and_the_weights(tmp_path):
    # No broker is reachable at this URL and no weights are in this cache: the refusal comes first.
    env = {k: v for k, v in os.environ.items() if k != pickle_weights.ALLOW_ENV}
    env.update(
        CELERY_BROKER_URL="redis://127.0.0.1:9/0", FEWSTEP_MODEL_CACHE=str(tmp_path), HF_HUB_OFFLINE="1"
    )
    result = cli("worker", "--model", SKETCH, "--device", "cpu", env=env, check=False, timeout=60)
    expected = f"model {SKETCH}: its controlnet is published as a pickle only"
    assert_one_line_error(result, expected, "--allow-pickle-conversion")
    assert result.returncode == 2


def test_a_pickle_whose_sha256_differs_from_the_pinned_one_is_refused(hub, cache, monkeypatch):
    from worker.model import load_model

    monkeypatch.setenv(pickle_weights.ALLOW_ENV, "1")
    with pytest.raises(UserError, match="refusing to convert it") as e:
        load_model(SKETCH, "cpu")
    pinned = resolve_model(SKETCH)["components"]["controlnet"]["sha256"]
    assert "\n" not in str(e.value) and f"not the pinned {pinned}" in str(e.value)
    assert not list((cache / "converted").glob("*/diffusion_pytorch_model.safetensors"))


def test_torch_older_than_2_6_is_refused(hub, cache, monkeypatch):
    monkeypatch.setenv(pickle_weights.ALLOW_ENV, "1")
    monkeypatch.setattr(pickle_weights.metadata, "version", lambda _: "2.5.1+cpu")
    with pytest.raises(UserError, match=r"needs torch >= 2\.6 .*CVE-2025-32434"):
        pickle_weights.check_convertible(resolve_model(SKETCH))


def test_conversion_runs_once_and_the_next_load_reads_only_the_safetensors(hub, replica_shas, cache):
    from worker.model import load_model

    sha = replica_shas[SKETCH]
    model = load_model(SKETCH, "cpu")
    converted = cache / "converted" / sha / "diffusion_pytorch_model.safetensors"
    assert converted.is_file() and (cache / "converted" / sha / "config.json").is_file()
    # The metadata's model_revision names the pickle the weights came from.
    assert f"controlnet.pickle_sha256={sha}" in model.revision.split()
    # Take the pickle away: the second load does not need it.
    source = pickle_path(hub, SKETCH)
    kept = source.read_bytes()
    source.unlink()
    try:
        again = load_model(SKETCH, "cpu")
    finally:
        source.write_bytes(kept)
    first, second = model.pipeline.controlnet.state_dict(), again.pipeline.controlnet.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_converted_model_computes_what_the_pickles_tensors_compute(hub, replica_shas, cache):
    from diffusers import ControlNetModel

    from worker.model import load_model

    model = load_model(SKETCH, "cpu").pipeline.controlnet
    state = torch.load(pickle_path(hub, SKETCH), weights_only=True)  # the same tensors, read directly
    direct = ControlNetModel.from_config(model.config)
    direct.load_state_dict(state, strict=True)
    torch.manual_seed(0)
    sample = torch.randn(1, model.config.in_channels, 16, 16)
    text = torch.randn(1, 4, model.config.cross_attention_dim)
    cond = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ours = model(sample, 500, text, cond, return_dict=False)
        theirs = direct.eval()(sample, 500, text, cond, return_dict=False)
    assert all(torch.equal(a, b) for a, b in zip(ours[0], theirs[0], strict=True))
    assert torch.equal(ours[1], theirs[1])


def test_a_bare_pickle_checkpoint_converts_into_the_base_architecture(hub, replica_shas, cache):
    from worker.model import load_model

    model = load_model(DMD2, "cpu")
    state = torch.load(pickle_path(hub, DMD2), weights_only=True)
    weights = model.pipeline.unet.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(weights[k], v.float()) for k, v in state.items())
    assert f"unet.pickle_sha256={replica_shas[DMD2]}" in model.revision.split()
