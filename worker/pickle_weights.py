"""Pickle-only weights, converted once to safetensors in the model cache, on an explicit opt-in.

Some pinned repositories publish a component only as a pickle (``.bin``): the SDXS sketch
ControlNet, DMD2's 1-step UNet, PixArt-α DMD's transformer. fewstep loads safetensors only,
so such a file is converted, never loaded as it is, and only when all of these hold:

- the preset names the file as pickle-only (``pickle`` in a component, or a ``file`` ending
  in ``.bin``) together with its ``sha256`` (from the hub's LFS pointer, config/hub_files.toml);
- the user opted in: ``worker --allow-pickle-conversion`` or ``FEWSTEP_ALLOW_PICKLE_CONVERSION=1``;
- torch is 2.6 or newer: older ``torch.load(weights_only=True)`` could be made to run code
  (CVE-2025-32434);
- the downloaded file's sha256 equals the preset's (a mismatch is refused).

It is read with ``torch.load(weights_only=True)`` (tensors and plain containers, no code),
written as ``<FEWSTEP_MODEL_CACHE>/converted/<sha256>/`` (atomically: two workers on one host
may race), and that safetensors file is what loads, then and on every later start, without
reading the pickle again. The source sha256 goes into the model's revision, and so into every
metadata row (``model_revision``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from fewstep import UserError

#: Environment variable behind ``worker --allow-pickle-conversion``.
ALLOW_ENV = "FEWSTEP_ALLOW_PICKLE_CONVERSION"
#: The first torch whose weights_only unpickler has no known code-execution bypass.
MIN_TORCH = (2, 6)
OPT_IN = f"--allow-pickle-conversion (or {ALLOW_ENV}=1)"


def allowed() -> bool:
    """Whether this process may convert pickles (the flag sets the environment variable)."""
    return os.environ.get(ALLOW_ENV, "") == "1"


def pickle_parts(preset: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The preset's components that exist only as a pickle, by component name."""
    found = {}
    for name, spec in (preset.get("components") or {}).items():
        if spec.get("pickle") or str(spec.get("file", "")).endswith(".bin"):
            found[name] = spec
    return found


def source_file(spec: dict[str, Any]) -> str:
    """The pickle's path in its repository (subfolder included)."""
    name = spec.get("pickle") or spec["file"]
    return "/".join(filter(None, [spec.get("subfolder"), name]))


def converted_dir(sha256: str) -> Path:
    """Where the conversion of the pickle with this sha256 lives."""
    from worker.tiny import cache_root

    return cache_root() / "converted" / sha256


def _weights_name(spec: dict[str, Any]) -> str:
    if spec.get("pickle"):  # a model folder: the name from_pretrained looks for
        return "diffusion_pytorch_model.safetensors"
    return Path(spec["file"]).with_suffix(".safetensors").name


def converted(spec: dict[str, Any]) -> Path | None:
    """The finished conversion of the component's pickle, if there is one."""
    sha = spec.get("sha256")
    path = converted_dir(sha) / _weights_name(spec) if sha else None
    return path if path is not None and path.is_file() else None


def _torch_version() -> tuple[int, int]:
    version = metadata.version("torch")  # without importing torch
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_convertible(preset: dict[str, Any]) -> None:
    """Refuse in one line, before the broker or a GPU, a preset whose pickle-only parts this
    process will not be able to load: no opt-in, no pinned sha256, or too old a torch."""
    for name, spec in pickle_parts(preset).items():
        if converted(spec):
            continue
        where = f"{spec['repo']}/{source_file(spec)}"
        what = f"model {preset['name']}: its {name} is published as a pickle only ({where})"
        if not spec.get("sha256"):
            raise UserError(f"{what} and no sha256 of it is pinned; fewstep converts no unpinned pickle")
        if not allowed():
            raise UserError(
                f"{what}; pass {OPT_IN} to convert it once to safetensors "
                "(read with torch.load weights_only=True)"
            )
        if _torch_version() < MIN_TORCH:
            raise UserError(
                f"{what}; converting it needs torch >= 2.6 (older weights_only loading can run code: "
                f"CVE-2025-32434), this is torch {metadata.version('torch')}"
            )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state_dict(path: str, label: str) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # the unpickler refuses anything but tensors and plain containers
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"model {label}: {Path(path).name} is not a plain tensor pickle: {first}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"model {label}: {Path(path).name} holds no flat state dict of tensors")
    # safetensors stores no shared or strided views: give each tensor its own contiguous storage.
    return {k: v.contiguous().clone() for k, v in state.items()}


def convert(spec: dict[str, Any], label: str, download) -> Path:
    """The component's weights as safetensors: the cached conversion, else converted now.

    ``download(filename)`` fetches a file of the component's repository at its revision (the
    loader's hub download, with its offline and error handling)."""
    done = converted(spec)
    if done:
        return done
    check_convertible({"name": label, "components": {"part": spec}})
    from safetensors.torch import save_file

    sha = spec["sha256"]
    path = download(source_file(spec))
    actual = _sha256(path)
    if actual != sha:
        raise UserError(
            f"model {label}: {spec['repo']}/{source_file(spec)} has sha256 {actual}, not the pinned "
            f"{sha}; refusing to convert it"
        )
    final = converted_dir(sha)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=final.parent))
    try:
        provenance = {"repo": spec["repo"], "revision": spec.get("revision"), "file": source_file(spec)}
        save_file(
            _state_dict(path, label),
            scratch / _weights_name(spec),
            metadata={"converted_by": "fewstep", "source_sha256": sha, **provenance},
        )
        if spec.get("pickle"):  # a model folder also needs its config
            shutil.copyfile(
                download("/".join(filter(None, [spec.get("subfolder"), "config.json"]))),
                scratch / "config.json",
            )
        (scratch / "source.json").write_text(json.dumps({**provenance, "sha256": sha}, indent=2))
        try:
            os.rename(scratch, final)
        except OSError:
            if not (final / _weights_name(spec)).is_file():
                raise  # another worker won the race only if its conversion is there
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final / _weights_name(spec)


def note(preset: dict[str, Any]) -> str | None:
    """What ``worker models`` says of a preset with pickle-only parts."""
    parts = pickle_parts(preset)
    if not parts:
        return None
    names = ", ".join(f"{name} ({spec['repo']}/{source_file(spec)})" for name, spec in parts.items())
    if not all(spec.get("sha256") for spec in parts.values()):
        return f"pickle-only {names} with no pinned sha256: not convertible"
    return f"needs {OPT_IN}: pickle-only {names}, converted once to safetensors against its pinned sha256"
