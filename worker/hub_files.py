"""The hub listings of config/hub_files.toml: what each pinned repository holds, as read offline.

``worker models`` says which presets load from a repository whose listing could not be
confirmed offline; the test replicas are built to match the confirmed ones.
"""

from __future__ import annotations

from typing import Any

from fewstep.settings import load_config


def listings() -> dict[str, dict[str, Any]]:
    """Every listed repository, by hub id."""
    return load_config("hub_files")


def repositories(preset: dict[str, Any]) -> list[tuple[str, str]]:
    """The (repository, revision) pairs a preset loads from: its base, components, VAEs, LoRA."""
    if str(preset.get("repo", "")).startswith("builtin:") or preset.get("kind") in ("hub", "local"):
        return []
    found = [(preset["repo"], preset["revision"])]
    parts = [*(preset.get("components") or {}).values(), *(preset.get("vaes") or {}).values()]
    for spec in filter(None, [*parts, preset.get("lora")]):
        pair = (spec["repo"], spec.get("revision", "main"))
        if pair not in found:
            found.append(pair)
    return found


def unconfirmed(preset: dict[str, Any]) -> list[str]:
    """The preset's repositories whose listing is not confirmed whole offline ("(partly)" where
    some folders were seen)."""
    known, found = listings(), []
    for repo, revision in repositories(preset):
        entry = known.get(repo, {})
        if entry.get("revision") != revision or entry.get("listing") == "unconfirmed":
            found.append(repo)
        elif entry["listing"] == "partial":
            found.append(f"{repo} (partly)")
    return found


def note(preset: dict[str, Any]) -> str | None:
    """What ``worker models`` says of the preset's listings, where one is not confirmed."""
    missing = unconfirmed(preset)
    if not missing:
        return None
    return "hub listing not confirmed offline (config/hub_files.toml) for " + ", ".join(missing)
