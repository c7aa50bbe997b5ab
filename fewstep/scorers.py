"""Scorer presets (``config/scorers.toml``) and the job spec's ``scoring`` entry.

Pure data: no torch here, so the producer can turn ``--score clip,aesthetic=DIR`` and
``--embeddings`` into the job spec without the GPU stack, and check (:func:`unavailable`) that
the models it names can be had. ``--score tiny`` (or ``NAME=tiny``) names the locally built
random-weight set (``builtin:tiny-clip``, ...; ``worker/tiny_scorers.py``);
``aesthetic.backbone=...`` replaces the CLIP the aesthetic head reads. The worker (``worker/scoring.py``)
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

A scorer whose card takes its tokenizer and preprocessing from another repository (pickscore,
hpsv2) has ``"processor": {"model", "revision"}``; HPS v2.1's entry also has ``"file"`` (its
pickle), ``"pickle": true``, the pinned ``"sha256"`` and ``"architecture"`` (OpenCLIP head
widths), which a worker's opt-in conversion needs (``worker/scorer_weights.py``).

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


#: ``--score tiny`` (every scorer) or ``--score NAME=tiny``: the random-weight set built locally.
TINY = "tiny"
#: Suffix of a scorer's backbone override: ``--score aesthetic.backbone=DIR``.
BACKBONE = ".backbone"


def scorer_presets() -> dict[str, dict[str, Any]]:
    """All scorer presets by name, in the file's order."""
    return {name: dict(p, name=name) for name, p in load_config("scorers").items() if name != "builtin"}


def tiny_model(name: str) -> tuple[str, str]:
    """(model, revision) of scorer ``name`` in the ``tiny`` set (``worker/tiny_scorers.py``)."""
    return f"builtin:tiny-{name}", str(load_config("scorers")["builtin"]["tiny_revision"])


def _location(name: str, value: str, preset: dict[str, Any]) -> tuple[str, str | None]:
    """(model, revision) of an override: ``tiny``, a local directory (absolute path, no
    revision) or a hub id, optionally ``@revision`` (default ``main``)."""
    if value == TINY:
        return tiny_model(preset["name"])
    if os.path.isdir(value):
        needed = preset.get("file") if preset.get("file") and not preset.get("pickle") else "config.json"
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
    if model.startswith("builtin:"):
        entry["licence"] = "none: random weights built locally (worker/tiny_scorers.py), for trying --score"
    local = model.startswith("builtin:") or os.path.isabs(model)
    if preset.get("file") and not (preset.get("pickle") and local):
        entry["file"] = preset["file"]
        if preset.get("pickle"):  # converted on the worker's opt-in (worker/scorer_weights.py)
            entry.update(pickle=True, sha256=preset["sha256"], architecture=dict(preset["architecture"]))
    processor = preset.get("processor")
    if processor and not local:
        # A hub model reads the tokenizer and preprocessing its card names; a local directory
        # (the tiny set, a conversion) has its own.
        entry["processor"] = {"model": processor["repo"], "revision": processor["revision"]}
    return entry


def parse_scores(values: Iterable[str]) -> dict[str, str | None]:
    """``clip,aesthetic=DIR`` (one or several values) → {scorer: override or None}, in the order
    given; ``tiny`` alone stands for every scorer ``=tiny``; ``NAME.backbone=...`` keys name a
    scorer's backbone override."""
    chosen: dict[str, str | None] = {}
    known = scorer_presets()
    backbones = [f"{n}{BACKBONE}" for n, p in known.items() if p.get("backbone")]
    for value in values:
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, eq, override = item.partition("=")
            name = name.strip()
            if name == TINY and not eq:
                chosen.update(dict.fromkeys(known, TINY))
                continue
            if name not in known and name not in backbones:
                raise UserError(
                    f"--score: unknown scorer {name!r}; choose from {', '.join(known)}, or {TINY} "
                    f"(all of them, random weights built locally){''.join(f', {b}=' for b in backbones)}"
                )
            if eq and not override.strip():
                raise UserError(f"--score {name}=: give {TINY}, a local directory or a hub id after '='")
            if name in backbones and not eq:
                raise UserError(f"--score {name}: give {name}=DIR or {name}=owner/name[@revision]")
            if override.strip() or name not in chosen:
                chosen[name] = override.strip() or None
    for name in chosen:
        if name in backbones and name.removesuffix(BACKBONE) not in chosen:
            raise UserError(f"--score {name}=...: add {name.removesuffix(BACKBONE)} to --score")
    return chosen


def scoring_spec(score: Iterable[str] = (), embeddings: bool = False) -> dict[str, Any] | None:
    """The job spec's ``scoring`` entry for ``--score`` values and ``--embeddings``; None for neither."""
    chosen = parse_scores(score)
    if not chosen and not embeddings:
        return None
    presets = scorer_presets()
    scorers: dict[str, dict[str, Any]] = {}
    for name, override in chosen.items():
        if name not in presets:
            continue  # a backbone override, applied with its scorer
        preset = presets[name]
        model, revision = (
            _location(name, override, preset) if override else (preset["repo"], preset["revision"])
        )
        scorers[name] = _entry(preset, model, revision)
        backbone = preset.get("backbone")
        if backbone:
            # The head was trained on the backbone preset's embeddings: another ``clip=`` does not
            # change it; the tiny head reads the tiny CLIP; NAME.backbone=... replaces it.
            theirs = chosen.get(f"{name}{BACKBONE}") or (TINY if override == TINY else None)
            if theirs:
                model, revision = _location(f"{name}{BACKBONE}", theirs, presets[backbone])
            else:
                model, revision = presets[backbone]["repo"], presets[backbone]["revision"]
            scorers[name]["backbone"] = {"model": model, "revision": revision}
    spec: dict[str, Any] = {"scorers": scorers, "embeddings": bool(embeddings)}
    if embeddings:
        clip = scorers.get(CLIP) or {"model": presets[CLIP]["repo"], "revision": presets[CLIP]["revision"]}
        spec["embedding_model"] = {"model": clip["model"], "revision": clip["revision"]}
    return spec


def embeddings_wanted(spec: dict[str, Any]) -> bool:
    """Whether the job ``spec`` asks for image embeddings (``--embeddings``)."""
    return bool((spec.get("scoring") or {}).get("embeddings"))


def scoring_models(scoring: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every model a job's ``scoring`` entry loads, each once per role: ``role`` (how errors name
    it), ``kind`` (clip, aesthetic, nsfw, pickscore, hpsv2, or processor: a scorer's tokenizer
    and preprocessing, loaded with it), ``model``, ``revision``, ``file`` (the one file a head or
    a pickle is, else None), ``option`` (the ``--score`` item that replaces it), and for scorers
    ``pickle`` and ``processor``."""
    if not scoring:
        return []
    models = []
    for name, s in (scoring.get("scorers") or {}).items():
        kind = "clip" if name == CLIP else name
        models.append(
            {"role": name, "kind": kind, "model": s["model"], "revision": s["revision"],
             "file": s.get("file"), "option": f"--score {name}=DIR", "pickle": bool(s.get("pickle")),
             "processor": s.get("processor")}
        )  # fmt: skip
        if s.get("processor"):
            p = s["processor"]
            models.append(
                {"role": f"{name}'s processor", "kind": "processor", "model": p["model"],
                 "revision": p["revision"], "file": "preprocessor_config.json",
                 "option": f"--score {name}=DIR"}
            )  # fmt: skip
        if s.get("backbone"):
            b = s["backbone"]
            models.append(
                {"role": f"{name}'s backbone", "kind": "clip", "model": b["model"], "revision": b["revision"],
                 "file": None, "option": f"--score {name}{BACKBONE}=DIR"}
            )  # fmt: skip
    if scoring.get("embeddings"):
        m = scoring["embedding_model"]
        models.append(
            {"role": "--embeddings' CLIP", "kind": "clip", "model": m["model"], "revision": m["revision"],
             "file": None, "option": "--score clip=DIR"}
        )  # fmt: skip
    return models


def label(model: str, revision: str | None) -> str:
    """``owner/name@revision`` (a commit shortened to 7 characters), or the directory."""
    if not revision:
        return model
    return f"{model}@{revision[:7] if re.fullmatch(r'[0-9a-f]{40}', revision) else revision}"


def _hub_problem(model: str, revision: str | None, filename: str, ask_hub: bool) -> str | None:
    """Why a hub model cannot be had here ("not cached", "not on the hub"), or None when it can:
    in the local Hugging Face cache, or (``ask_hub``) on the hub at that revision."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, filename, revision=revision), str):
        return None
    if not ask_hub or constants.HF_HUB_OFFLINE:
        return "not cached"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(model, revision=revision, timeout=float(os.environ.get("FEWSTEP_HUB_TIMEOUT", 10)))
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return "not on the hub"
    except Exception:  # offline, proxy, DNS: the workers may still have it cached
        return "not cached, hub not reachable"
    return None


def unavailable(scoring: dict[str, Any] | None, *, ask_hub: bool = True) -> str | None:
    """One line naming the scorer models of ``scoring`` this machine cannot load and how to
    provide them; None when every one is a local directory with weights, the ``tiny`` set, in
    the local Hugging Face cache, or (``ask_hub``) on a reachable hub."""
    by_model: dict[tuple[str, str | None, str | None], list[dict[str, Any]]] = {}
    for m in scoring_models(scoring):
        if not m["model"].startswith("builtin:"):
            by_model.setdefault((m["model"], m["revision"], m["file"]), []).append(m)
    missing: list[str] = []
    options: list[str] = []
    downloads: list[str] = []
    hub_down = False
    for (model, revision, file), uses in by_model.items():
        filename = file or "config.json"
        if os.path.isabs(model):
            problem = None
            if not os.path.isfile(os.path.join(model, filename)):
                problem = f"no {filename}"
            elif not file and not any(f.endswith(".safetensors") for f in os.listdir(model)):
                problem = "no .safetensors weights"
            where = model
        else:
            problem = _hub_problem(model, revision, filename, ask_hub and not hub_down)
            hub_down = hub_down or bool(problem and problem.startswith("not cached"))
            where = label(model, revision)
            if problem:
                downloads.append(f"hf download {model} --revision {revision}")
        if problem:
            missing.append(f"{' and '.join(u['role'] for u in uses)} ({where}: {problem})")
            options.extend(u["option"] for u in uses)
    if not missing:
        return None
    from huggingface_hub import constants

    how = []
    if downloads:
        how.append(
            f"put them in the Hugging Face cache of every worker ({constants.HF_HUB_CACHE}) where the hub "
            f"can be reached: {'; '.join(dict.fromkeys(downloads))}"
        )
    how.append(f"give a local copy ({', '.join(dict.fromkeys(options))})")
    how.append("try scores offline with --score tiny (random weights built locally)")
    return f"scorer weights missing: {', '.join(missing)}; {', or '.join(how)}"
