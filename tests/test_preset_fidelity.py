"""Presets load what their cards and repositories say, and `worker models` says what it knows.

- SDXL-Turbo decodes with its own VAE, as its card does; the fp16-fix VAE is an option
  (``worker --vae fp16-fix``), recorded in the metadata's ``vae`` column when used.
- PixArt-α's T5 text encoder loads from its fp16 files (half the download); the transformer,
  which has none, from its full-precision ones.
- Every preset is pinned to a commit, or says why not (``revision_note``); every preset
  declares gating, conditioning modes and commercial use, and ``worker models`` lists them.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from fewstep import UserError
from fewstep.presets import UNMEASURED, listing, pinned, presets, resolve_model
from tests import replicas
from tests.replicas.hub import offline


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    with offline(root):
        yield replicas.build(root, {"sdxl-turbo", "pixart-alpha-512"})


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y.to(x.dtype)) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_sdxl_turbo_decodes_with_its_own_vae_and_fp16_fix_on_request(hub):
    from diffusers import AutoencoderKL

    from worker.model import load_model
    from worker.speed import SpeedOptions, apply

    model = load_model("sdxl-turbo", "cpu")
    preset = model.preset
    own = AutoencoderKL.from_pretrained(
        preset["repo"], subfolder="vae", revision=preset["revision"], variant=preset["variant"]
    )
    assert same_weights(model.pipeline.vae, own) and "vae=" not in model.revision

    applied = apply(model, SpeedOptions(vae="fp16-fix", channels_last=False))
    spec = preset["vaes"]["fp16-fix"]
    fix = AutoencoderKL.from_pretrained(spec["repo"], revision=spec["revision"])
    assert same_weights(model.pipeline.vae, fix)
    assert applied["vae"] == f"fp16-fix:{spec['repo']}@{spec['revision']}"

    with pytest.raises(
        UserError, match="unknown --vae 'fp32' for model sdxl-turbo: use default, tiny, fp16-fix"
    ):
        apply(model, SpeedOptions(vae="fp32"))


def test_pixart_loads_its_t5_from_the_fp16_files(hub):
    from transformers import T5EncoderModel

    from worker.model import load_model

    model = load_model("pixart-alpha-512", "cpu")
    preset = model.preset
    source = {"subfolder": "text_encoder", "revision": preset["revision"]}
    half = T5EncoderModel.from_pretrained(preset["repo"], variant="fp16", **source)
    full = T5EncoderModel.from_pretrained(preset["repo"], **source)
    assert same_weights(model.pipeline.text_encoder, half)
    assert not same_weights(model.pipeline.text_encoder, full)  # fp16 rounding shows
    assert next(model.pipeline.transformer.parameters()).dtype == torch.float32  # its only files


def test_every_preset_is_pinned_or_says_why_not():
    for name, preset in presets().items():
        assert pinned(preset) or preset.get("revision_note"), name
    assert resolve_model("lcm-lora-sdv1-5")["revision"] == "main"  # the mirror's commits: unconfirmed
    assert pinned(resolve_model("yoso-pixart-1024")) and not pinned(resolve_model("yoso-pixart-512"))


def test_every_preset_declares_gating_conditioning_and_commercial_use():
    import diffusers

    for name, preset in presets().items():
        assert isinstance(preset.get("gated"), bool), name
        assert preset.get("commercial") in ("yes", "no", "limited", "unclear"), name
        # The modes it lists are the ones its data can run: text (not a ControlNet preset),
        # init (an img2img table naming a class diffusers has), its ControlNet's modes.
        control = preset.get("control") or {}
        img2img = preset.get("img2img")
        modes = (["text"] if not control else []) + (["init"] if img2img else []) + control.get("modes", [])
        assert preset.get("conditioning") == modes, name
        if img2img:
            assert (
                hasattr(diffusers, img2img["pipeline"]) and int(img2img["steps"] * img2img["strength"]) >= 1
            )
        if control:
            assert (
                preset["pipeline"] == "StableDiffusionControlNetPipeline"
                and control["default"] in control["modes"]
            )
    assert resolve_model("sd35-large-turbo")["gated"] is True


def test_worker_models_lists_revision_gating_vram_modes_vaes_and_notes():
    from worker.cli import cli

    out = CliRunner().invoke(cli, ["models"]).output
    table, _, notes = out.partition("\n\n")
    header, *lines = table.splitlines()
    assert header.split() == ["preset", *listing(presets()["tiny"])]
    rows = {line.split()[0]: line.split() for line in lines}
    columns = header.split()
    turbo = dict(zip(columns, rows["sdxl-turbo"], strict=False))
    assert (turbo["revision"], turbo["gated"], turbo["vram"], turbo["modes"]) == (
        "pinned",
        "no",
        UNMEASURED,
        "text,init",
    )
    assert (turbo["vaes"], turbo["commercial"]) == ("default,fp16-fix", "no")
    assert dict(zip(columns, rows["sd35-large-turbo"], strict=False))["gated"] == "yes"
    assert dict(zip(columns, rows["yoso-sd15-1step"], strict=False))["revision"] == "unpinned"
    assert f"model yoso-sd15-1step: {presets()['yoso-sd15-1step']['revision_note']}" in notes


def test_worker_models_json_gives_every_preset_whole_a_line_each():
    from worker.cli import cli

    lines = CliRunner().invoke(cli, ["models", "--json"]).output.splitlines()
    rows = {r["preset"]: r for r in map(json.loads, lines)}
    assert set(rows) == set(presets())
    assert rows["sdxl-turbo"]["vaes"] == "default,fp16-fix" and rows["tiny"]["why"] is None
    assert "pickle" in rows["pixart-alpha-dmd-512"]["why"]
    # Which presets need the conversion opt-in, and whose hub listings are not confirmed.
    needs = {name for name, r in rows.items() if r["pickle_conversion"]}
    assert needs == {"sdxs-512-dreamshaper-sketch", "dmd2-sdxl-1step", "pixart-alpha-dmd-512"}
    assert "--allow-pickle-conversion" in rows["dmd2-sdxl-1step"]["pickle_conversion"]
    assert "no pinned sha256" in rows["pixart-alpha-dmd-512"]["pickle_conversion"]
    assert "dreamshaper-sketch" not in (rows["sdxs-512-dreamshaper-sketch"]["hub_listing"] or "")
    assert "Qwen/Qwen-Image" in rows["qwen-image-lightning-4step"]["hub_listing"]
