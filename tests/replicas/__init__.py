"""Tiny random-weight replicas of every hub repository the presets name.

Each replica has the real pipeline class, component classes, scheduler configuration and
file layout (LoRA files, bare UNet checkpoints, a SentencePiece T5 tokenizer) with tiny
configs, and is written into a hub cache (``hub.py``) at the commit the preset pins. The
repositories to build are read from ``config/models.toml`` itself: a preset whose
repository has no replica here fails the build, naming it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from fewstep.presets import presets
from tests.replicas import flow, pixart, qwen, sana, sdxl, stable_diffusion, z_image
from tests.replicas.hub import HubCache
from worker import tiny
from worker.hub_files import listings

# Hub repository → builder(snapshot folder, files the presets ask of it).
BUILDERS = {
    "IDKiro/sdxs-512-0.9": stable_diffusion.sdxs_09,
    "IDKiro/sdxs-512-dreamshaper": stable_diffusion.sdxs_dreamshaper,
    "IDKiro/sdxs-512-dreamshaper-sketch": stable_diffusion.sdxs_dreamshaper_sketch,
    "stabilityai/sd-turbo": stable_diffusion.sd_turbo,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": stable_diffusion.sd15,
    "SimianLuo/LCM_Dreamshaper_v7": stable_diffusion.lcm_dreamshaper,
    "XCLiu/instaflow_0_9B_from_sd_1_5": stable_diffusion.instaflow,
    "latent-consistency/lcm-lora-sdv1-5": stable_diffusion.sd15_lora,
    "Luo-Yihong/yoso_sd1.5_lora": stable_diffusion.sd15_lora,
    "ByteDance/Hyper-SD": stable_diffusion.sd15_lora,
    "stabilityai/stable-diffusion-xl-base-1.0": sdxl.sdxl_base,
    "stabilityai/sdxl-turbo": sdxl.sdxl_turbo,
    "madebyollin/sdxl-vae-fp16-fix": sdxl.vae_fp16_fix,
    "ByteDance/SDXL-Lightning": sdxl.base_unet_files,
    "tianweiy/DMD2": sdxl.base_unet_files,
    "PixArt-alpha/PixArt-XL-2-512x512": pixart.pixart_512,
    "Luo-Yihong/yoso_pixart512": pixart.yoso_512,
    "Luo-Yihong/yoso_pixart1024": pixart.yoso_1024,
    "black-forest-labs/FLUX.1-schnell": flow.flux_schnell,
    "stabilityai/stable-diffusion-3.5-large-turbo": flow.sd35_large_turbo,
    "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers": sana.sana_sprint(600),
    "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers": sana.sana_sprint(610),
    "Tongyi-MAI/Z-Image-Turbo": z_image.z_image_turbo,
    "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512": pixart.dmd_512,
    "black-forest-labs/FLUX.2-klein-4B": qwen.flux2_klein_4b,
    "Qwen/Qwen-Image": qwen.qwen_image,
    "lightx2v/Qwen-Image-Lightning": qwen.lightning_loras,
}


def sources(presets_only: set[str] | None = None) -> dict[tuple[str, str], list[str]]:
    """Every (repository, revision) the presets (or ``presets_only``) load from, with the files
    they name in it."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, preset in presets().items():
        if preset["repo"].startswith("builtin:") or (presets_only is not None and name not in presets_only):
            continue
        found[(preset["repo"], preset["revision"])]
        extras = [
            *preset.get("components", {}).values(),
            *preset.get("vaes", {}).values(),
            preset.get("lora"),
        ]
        for spec in filter(None, extras):
            files = found[(spec["repo"], spec.get("revision", "main"))]
            if spec.get("file") and spec["file"] not in files:
                files.append(spec["file"])
    return dict(found)


def listed_files(repo: str) -> tuple[set[str], list[str]] | None:
    """The files config/hub_files.toml lists for ``repo`` and the folders it lists whole ("" the
    top level); None where no listing was confirmed."""
    entry = listings().get(repo)
    if not entry or entry["listing"] == "unconfirmed":
        return None
    folders = [""] if entry["listing"] == "complete" else list(entry.get("folders", []))
    return {f["path"] for f in entry["files"]}, folders


def in_folders(path: str, folders: list[str]) -> bool:
    """Whether ``path`` lies in one of ``folders`` ("" as the top level: the whole repository
    for a complete listing, only top-level files for a partial one)."""
    parent = path.rpartition("/")[0]
    return any(parent == f or (f and parent.startswith(f + "/")) for f in folders) or folders == [""]


PLACEHOLDER = b"placeholder: a file of the hub repository no preset loads\n"


WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".onnx", ".onnx_data", ".gguf")


def _match_listing(snapshot: Path, repo: str) -> tuple[list[str], list[str]]:
    """Make the replica's files the listing's; the files added and removed, for tests to judge.

    Files the library wrote that the repository lacks (transformers 5's tokenizer.json beside
    a vocab.json and merges.txt) are removed from the folders listed whole; every listed file
    the replica lacks (READMEs, images, parts no preset loads) is written as a placeholder, no
    valid weights: loading the replica offline then succeeds only if the loader asks for listed
    files. A builder must itself write every weight file a preset loads (test_hub_listings)."""
    listed = listed_files(repo)
    if listed is None:
        return [], []
    files, folders = listed
    added, removed = [], []
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        name = str(path.relative_to(snapshot))
        if name not in files and in_folders(name, folders):
            path.unlink()
            removed.append(name)
    for name in sorted(files):
        target = snapshot / name
        if target.name in ("vocab.json", "merges.txt") and not target.exists():
            # The repository's CLIP tokenizer is vocab.json + merges.txt (transformers 5 saved
            # the replica's as tokenizer.json): the same byte-level vocabulary, in those files.
            tiny.write_tokenizer_files(target.parent)
            added.append(name)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # An empty JSON object where the library reads one it did not write itself
            # (transformers 5 writes no special_tokens_map.json).
            target.write_bytes(b"{}" if name.endswith(".json") else PLACEHOLDER)
            added.append(name)
    return added, removed


def build(root: Path, presets_only: set[str] | None = None) -> HubCache:
    """Write the replicas into a hub cache at ``root``: every repository the presets name, or
    only those ``presets_only`` load from (a test of a few presets need not build them all)."""
    hub = HubCache(root)
    for (repo, revision), files in sorted(sources(presets_only).items()):
        if repo not in BUILDERS:
            raise KeyError(f"no replica for hub repository {repo} (add one to tests/replicas)")
        snapshot = hub.snapshot(repo, revision)
        BUILDERS[repo](snapshot, files)
        hub.matched[repo] = _match_listing(snapshot, repo)
    return hub
