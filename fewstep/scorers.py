"""Scorer presets (``config/scorers.toml``) and the job spec's ``scoring`` entry.

Pure data: no torch here, so the producer can turn ``--score clip,aesthetic=DIR`` and
``--embeddings`` into the job spec without the GPU stack. The worker (``worker/scoring.py``)
loads what the spec says, never its own config, so every worker of a job scores alike::

    "scoring": {
      "scorers": {
        "clip": {"model": "openai/clip-vit-large-patch14", "revision": "32bd...", "column": "clip_score",
                 "licence": "..."},
        "aesthetic": {"model": "ttj/...", "revision": "...", "file": "model.safetensors",
                      "backbone": {"model": "openai/clip-vit-large-patch14", "revision": "32bd..."}, ...},
        "nsfw": {...}
      },
      "embeddings": true,
      "embedding_model": {"model": "openai/clip-vit-large-patch14", "revision": "32bd..."}
    }

``embedding_model`` (only with ``--embeddings``) is the CLIP whose normalised image
embeddings are stored: the ``clip`` scorer's model when the job scores with it (so an
override applies to both), else the ``clip`` preset's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from fewstep import UserError
from fewstep.settings import load_config

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,99}")

#: The scorer whose CLIP model the embeddings (and the aesthetic head's input) come from.
CLIP = "clip"


def scorer_presets() -> dict[str, dict[str, Any]]:
    """All scorer presets by name, in the file's order."""
    return {name: dict(p, name=name) for name, p in load_config("scorers").items()}


def _location(name: str, value: str, preset: dict[str, Any]) -> tuple[str, str | None]:
    """(model, revision) of an override: a local directory (absolute path, no revision) or a
    hub id, optionally ``@revision`` (default ``main``)."""
    if os.path.isdir(value):
        needed = preset.get("file") or "config.json"
        if not os.path.isfile(os.path.join(value, needed)):
            raise UserError(f"--score {name}={value}: the directory has no {needed}")
        return os.path.abspath(value), None
    repo, _, revision = value.partition("@")
    revision = revision or "main"
    if _HUB_ID.fullmatch(repo) and not repo.startswith(("./", "../")) and _REVISION.fullmatch(revision):
        return repo, revision
    raise UserError(f"--score {name}={value}: neither a local directory nor a hub id (owner/name[@revision])")


def _entry(preset: dict[str, Any], model: str, revision: str | None) -> dict[str, Any]:
    entry = {"model": model, "revision": revision, "column": preset["column"]}
    overridden = (model, revision) != (preset["repo"], preset["revision"])
    entry["licence"] = f"see {model}" if overridden else preset["licence"]
    if preset.get("file"):
        entry["file"] = preset["file"]
    return entry


def parse_scores(values: Iterable[str]) -> dict[str, str | None]:
    """``clip,aesthetic=DIR`` (one or several values) → {scorer: override or None}, in the order given."""
    chosen: dict[str, str | None] = {}
    known = scorer_presets()
    for value in values:
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, eq, override = item.partition("=")
            name = name.strip()
            if name not in known:
                raise UserError(f"--score: unknown scorer {name!r}; choose from {', '.join(known)}")
            if eq and not override.strip():
                raise UserError(f"--score {name}=: give a local directory or a hub id after '='")
            if override.strip() or name not in chosen:
                chosen[name] = override.strip() or None
    return chosen


def scoring_spec(score: Iterable[str] = (), embeddings: bool = False) -> dict[str, Any] | None:
    """The job spec's ``scoring`` entry for ``--score`` values and ``--embeddings``; None for neither."""
    chosen = parse_scores(score)
    if not chosen and not embeddings:
        return None
    presets = scorer_presets()
    scorers: dict[str, dict[str, Any]] = {}
    for name, override in chosen.items():
        preset = presets[name]
        model, revision = (
            _location(name, override, preset) if override else (preset["repo"], preset["revision"])
        )
        scorers[name] = _entry(preset, model, revision)
        backbone = preset.get("backbone")
        if backbone:
            scorers[name]["backbone"] = {
                "model": presets[backbone]["repo"],
                "revision": presets[backbone]["revision"],
            }
    spec: dict[str, Any] = {"scorers": scorers, "embeddings": bool(embeddings)}
    if embeddings:
        clip = scorers.get(CLIP) or {"model": presets[CLIP]["repo"], "revision": presets[CLIP]["revision"]}
        spec["embedding_model"] = {"model": clip["model"], "revision": clip["revision"]}
    return spec


def embeddings_wanted(spec: dict[str, Any]) -> bool:
    """Whether the job ``spec`` asks for image embeddings (``--embeddings``)."""
    return bool((spec.get("scoring") or {}).get("embeddings"))
