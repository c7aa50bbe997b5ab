"""A Hugging Face hub cache on disk, in the hub's own layout, that replicas are written into.

``models--owner--name/snapshots/<commit>/...`` plus ``refs/<revision>`` naming the commit:
with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing here, ``from_pretrained(repo_id,
revision=...)``, ``hf_hub_download`` and ``load_lora_weights`` find a replica exactly where
they would find the real download, so the presets' real loading code runs unchanged.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path

_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubCache:
    """A hub cache directory (what ``HF_HUB_CACHE`` points at)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        #: Per repository, the files made to match its hub listing: (added, removed).
        self.matched: dict[str, tuple[list[str], list[str]]] = {}

    def snapshot(self, repo: str, revision: str) -> Path:
        """The snapshot folder of ``repo`` at ``revision``; a branch gets a made-up commit and a ref."""
        folder = self.root / ("models--" + repo.replace("/", "--"))
        commit = (
            revision
            if _COMMIT.fullmatch(revision)
            else hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        )
        if commit != revision:
            (folder / "refs").mkdir(parents=True, exist_ok=True)
            (folder / "refs" / revision).write_text(commit)
        path = folder / "snapshots" / commit
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, repo: str, revision: str) -> str:
        """The commit that ``revision`` of ``repo`` resolves to in this cache."""
        return self.snapshot(repo, revision).name


@contextmanager
def offline(cache: Path):
    """Point this process (and the processes it starts) at ``cache``, offline."""
    from huggingface_hub import constants

    saved = {k: os.environ.get(k) for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    old_cache, old_offline = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    # huggingface_hub reads both at import; its download functions read the module attributes.
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache), True
    try:
        yield cache
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = old_cache, old_offline
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
