"""Model presets (``config/models.toml``) and how a ``--model`` value is resolved.

Pure data: no torch here, so the producer can validate a model name and read its
steps, guidance and size without loading the GPU stack.
"""

from __future__ import annotations

import os
import re
from typing import Any

from fewstep import UserError
from fewstep.settings import defaults, load_config

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

#: Environment variable behind ``producer enqueue --allow-synthetic``.
ALLOW_SYNTHETIC_ENV = "FEWSTEP_ALLOW_SYNTHETIC"


def presets() -> dict[str, dict[str, Any]]:
    """All presets by name."""
    return {name: dict(p, name=name) for name, p in load_config("models").items()}


def resolve_model(model: str) -> dict[str, Any]:
    """The preset for ``model``: a preset name, a hub id or a local directory.

    A hub id or directory that is not a preset gets the ``[generic_model]`` defaults
    and ``kind`` "hub" or "local"; presets have ``kind`` "preset".
    """
    known = presets()
    if model in known:
        return dict(known[model], kind="preset")
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise UserError(f"{model} is a directory but has no model_index.json (not a diffusers pipeline)")
        return dict(
            defaults()["generic_model"], name=model, repo=os.path.abspath(model), revision=None, kind="local"
        )
    if _HUB_ID.fullmatch(model) and not model.startswith(("./", "../")):
        return dict(defaults()["generic_model"], name=model, repo=model, revision="main", kind="hub")
    raise UserError(
        f"unknown model {model!r}: not a preset ({', '.join(sorted(known))}), "
        "a hub id (owner/name) or a local directory"
    )


def availability(preset: dict[str, Any]) -> str:
    """The preset's status: available, benchmarks only (``benchmark_only``) or unavailable."""
    if preset.get("unavailable"):
        return "unavailable"
    return "benchmarks only" if preset.get("benchmark_only") else "available"


def check_runnable(preset: dict[str, Any], *, allow_benchmark: bool = False) -> dict[str, Any]:
    """``preset`` if its jobs can run, else a :class:`UserError` saying why in one line.

    A preset marked ``unavailable`` (the reason, as data in ``config/models.toml``) is always
    refused; a ``benchmark_only`` one (``synthetic``: no weights, no real images) only
    without the opt-in, so a dataset job never gets fake images by a slip of ``--model``.
    """
    state = availability(preset)
    if state == "unavailable":
        raise UserError(f"model {preset['name']} is unavailable: {preset['unavailable']}")
    if state == "benchmarks only" and not allow_benchmark:
        raise UserError(
            f"model {preset['name']} is for benchmarks only (no weights, no real images): "
            f"pass --allow-synthetic or set {ALLOW_SYNTHETIC_ENV}=1 to enqueue it"
        )
    return preset


def samplers(preset: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The samplers a preset allows, label → scheduler spec; the default (``sampler``) first.

    A hub id or local directory declares none: it runs the scheduler its repository ships.
    """
    if not preset.get("sampler"):
        return {}
    return {preset["sampler"]: dict(preset.get("scheduler") or {}), **preset.get("samplers", {})}


def sampler_spec(preset: dict[str, Any], label: str) -> dict[str, Any]:
    """The scheduler spec of the preset's sampler ``label``, else a :class:`UserError`."""
    allowed = samplers(preset)
    if label not in allowed:
        offer = f"one of {', '.join(allowed)}" if allowed else "none (it runs its repository's scheduler)"
        raise UserError(f"model {preset['name']} has no sampler {label!r}: choose {offer}")
    return allowed[label]


def check_generation(preset: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """``generation`` (steps, sampler, …) if the preset can run it, else a :class:`UserError`.

    The producer checks a job with it before enqueueing; the worker checks every batch.
    """
    if generation.get("sampler") is not None:
        sampler_spec(preset, generation["sampler"])
    timesteps = preset.get("timesteps")
    if timesteps and generation["steps"] != len(timesteps):
        raise UserError(
            f"model {preset['name']} runs the fixed timesteps {timesteps} from its card: "
            f"steps must be {len(timesteps)}, not {generation['steps']}"
        )
    return generation


#: What ``worker models`` shows where a preset has no GPU measurement of its memory yet.
UNMEASURED = "unmeasured"


def pinned(preset: dict[str, Any]) -> bool:
    """Whether the base repository and every part from another one load at a fixed commit
    (a branch such as ``main`` can move under a job)."""
    parts = [preset, *(preset.get("components") or {}).values(), preset.get("lora") or {}]
    return all(
        re.fullmatch(r"[0-9a-f]{40}", str(p.get("revision", ""))) for p in parts if p.get("repo")
    ) or str(preset.get("repo", "")).startswith("builtin:")


def listing(preset: dict[str, Any]) -> dict[str, str]:
    """The facts ``worker models`` shows for a preset, as text, read from its data.

    ``gated`` and ``conditioning`` are data each preset declares (``?`` where one does not);
    ``vram`` is a GPU measurement once one exists, else "unmeasured".
    """
    gated = preset.get("gated")
    return {
        "steps": str(preset["steps"]),
        "cfg": f"{preset['guidance']:g}",
        "size": f"{preset['width']}x{preset['height']}",
        "dtype": preset.get("dtype", ""),
        "samplers": ",".join(samplers(preset)) or "-",
        "status": availability(preset).replace(" ", "-"),
        "revision": "pinned" if pinned(preset) else "unpinned",
        "gated": "?" if gated is None else "yes" if gated else "no",
        "vram": str(preset.get("vram") or UNMEASURED),
        "modes": ",".join(preset.get("conditioning") or ["?"]),
        "vaes": ",".join(["default", *(preset.get("vaes") or {})]),
        "commercial": str(preset.get("commercial", "?")),
        "licence": preset.get("license", ""),
    }
