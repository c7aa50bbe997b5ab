"""A copy of config/ whose pickle sha256s are the replicas' own, for tests of the conversion.

The replicas' pickles are tiny random weights, not the hub's files, so the presets' pinned
sha256s refuse them, as they should. Tests that load a pickle-only preset through the
conversion point ``FEWSTEP_CONFIG_DIR`` at this copy, where each such component pins the
sha256 of its replica file (measured here with hashlib).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from fewstep.presets import presets
from fewstep.settings import config_dir
from tests.replicas.hub import HubCache
from worker import pickle_weights


def replica_pickle(hub: HubCache, spec: dict) -> Path:
    """The replica's pickle for a pickle-only component."""
    return hub.snapshot(spec["repo"], spec["revision"]) / pickle_weights.source_file(spec)


def config_with_replica_shas(hub: HubCache, names: set[str], directory: Path) -> dict[str, str]:
    """Write the copy into ``directory``; each preset's replica sha256, by preset name."""
    shutil.copytree(config_dir(), directory)
    text, measured = (directory / "models.toml").read_text(), {}
    for name in sorted(names):
        for part, spec in pickle_weights.pickle_parts(presets()[name]).items():
            sha = hashlib.sha256(replica_pickle(hub, spec).read_bytes()).hexdigest()
            measured[name] = sha
            header = f"[{name}.components.{part}]\n"
            start = text.index(header) + len(header)
            end = text.find("\n[", start)
            section = text[start:end]
            if "sha256 = " in section:
                section = re.sub(r'sha256 = "[0-9a-f]*"', f'sha256 = "{sha}"', section)
            else:
                section = re.sub(r'^((?:pickle|file) = ".*")$', rf'\1\nsha256 = "{sha}"', section, flags=re.M)
            text = text[:start] + section + text[end:]
    (directory / "models.toml").write_text(text)
    return measured
