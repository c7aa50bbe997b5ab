"""The hub listings (config/hub_files.toml) cover every repository the presets load, and the
replicas hold exactly the files the confirmed listings show, in the same formats.

A replica whose files are the listing's, in an offline hub cache, can only be loaded if the
loader asks for listed files (an unlisted one is missing; a listed file no preset loads is a
placeholder, no valid weights): tests/test_presets.py loads every preset from them, and
tests/test_pickle_conversion.py the pickle-only ones.
"""

from __future__ import annotations

import re

import pytest

from fewstep.presets import presets
from tests import replicas
from tests.replicas.hub import offline
from worker import hub_files, pickle_weights

#: Presets that, between them, load every repository with a confirmed (complete or partial) listing.
CONFIRMED = {
    "sdxs-512-0.9", "sdxs-512-dreamshaper", "sdxs-512-dreamshaper-sketch", "sd-turbo", "dmd2-sdxl-1step",
    "sdxl-lightning-4step",
}  # fmt: skip


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    with offline(root):
        yield replicas.build(root, CONFIRMED | {"pixart-alpha-dmd-512"})


def test_every_repository_a_preset_loads_has_a_listing_at_the_pinned_revision():
    listed = hub_files.listings()
    for name, preset in presets().items():
        for repo, revision in hub_files.repositories(preset):
            entry = listed.get(repo)
            assert entry, f"{name}: {repo} has no entry in config/hub_files.toml"
            assert entry["revision"] == revision, (name, repo)
            assert entry["listing"] in ("complete", "partial", "unconfirmed")
            for f in entry.get("files", []):
                assert not f.get("sha256") or re.fullmatch(r"[0-9a-f]{64}", f["sha256"]), f


def test_a_pickle_a_preset_converts_is_one_the_listing_flags_with_the_same_sha256():
    listed = hub_files.listings()
    found = 0
    for name, preset in presets().items():
        for part, spec in pickle_weights.pickle_parts(preset).items():
            files = {f["path"]: f for f in listed[spec["repo"]]["files"]}
            entry = files[pickle_weights.source_file(spec)]
            assert entry["format"] == "pickle", (name, part)
            assert spec.get("sha256") == entry.get("sha256"), (name, part)  # both absent for PixArt-DMD
            found += 1
    assert found == 3  # SDXS sketch ControlNet, DMD2 1-step UNet, PixArt-α DMD transformer


def test_replicas_hold_the_listed_files_in_the_listed_formats(hub):
    import json

    checked = 0
    for (repo, revision), named in replicas.sources(CONFIRMED | {"pixart-alpha-dmd-512"}).items():
        listed = replicas.listed_files(repo)
        if listed is None:
            continue
        files, folders = listed
        snapshot = hub.snapshot(repo, revision)
        made = {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()}
        assert {f for f in made if replicas.in_folders(f, folders)} == {
            f for f in files if replicas.in_folders(f, folders)
        }, repo
        assert files <= made and set(named) <= files, repo  # what the presets name is on the hub
        # The builder itself wrote every weight file of a folder the pipeline loads, in the
        # listed format and variant, and none the repository lacks; matching the listing only
        # added READMEs, images, tokenizer text files and weights no preset loads.
        added, removed = hub.matched[repo]
        index = snapshot / "model_index.json"
        loaded = set(json.loads(index.read_text())) if index.is_file() else set()
        loaded |= {  # model folders presets load from this repository as a component
            spec.get("subfolder") or ""
            for p in presets().values()
            for spec in [*(p.get("components") or {}).values(), *(p.get("vaes") or {}).values()]
            if spec["repo"] == repo and "file" not in spec
        }
        for name in added + removed:
            if name.endswith(replicas.WEIGHTS):
                assert name in added and name.rpartition("/")[0] not in loaded, (repo, name)
                assert name not in named, (repo, name)
        checked += 1
    assert checked == 7  # the confirmed repositories these presets load


def test_a_pickle_only_replica_has_no_safetensors_to_fall_back_on(hub):
    for name in ("sdxs-512-dreamshaper-sketch", "pixart-alpha-dmd-512"):
        spec = next(iter(pickle_weights.pickle_parts(presets()[name]).values()))
        folder = hub.snapshot(spec["repo"], spec["revision"]) / (spec.get("subfolder") or "")
        assert (folder / "diffusion_pytorch_model.bin").is_file()
        assert not list(folder.glob("*.safetensors")), name
