"""Job progress, read from storage (commit markers), never from Redis."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fewstep import UserError
from fewstep.contract import (
    FAILED,
    JOB_SPEC_KEY,
    METADATA,
    images_per_prompt,
    job_layout,
    shard_of_key,
    shard_rows,
)
from fewstep.storage import KeyMissing, Store


def read_spec(job_store: Store) -> dict[str, Any]:
    """The job spec, or a UserError naming where it was looked for."""
    try:
        return json.loads(job_store.get(JOB_SPEC_KEY))
    except KeyMissing:
        raise UserError(f"no job at {job_store.url} (no {JOB_SPEC_KEY})") from None


@dataclass
class Progress:
    spec: dict[str, Any]
    committed: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    # What the read listed: {folder: [(key, size), ...]}, so a caller that also reads the
    # objects (status reads the failed markers) does not list the folder a second time.
    listings: dict[str, list[tuple[str, int]]] = field(default_factory=dict, repr=False)

    @property
    def shards_total(self) -> int:
        return int(self.spec["counts"]["shards"])

    @property
    def images_done(self) -> int:
        # A committed shard holds exactly one image per manifest row.
        return sum(shard_rows(self.spec, s) for s in self.committed)

    @property
    def open_shards(self) -> list[int]:
        """Shards neither committed nor given up on."""
        return [
            s for s in range(1, self.shards_total + 1) if s not in self.committed and s not in self.failed
        ]

    @property
    def state(self) -> str:
        if len(self.committed) == self.shards_total:
            return "done"
        if not self.open_shards:
            return "failed"
        return "running" if self.committed or self.failed else "queued"

    def summary(self) -> dict[str, Any]:
        return {
            "job": self.spec["job"],
            "job_url": self.spec["job_url"],
            "state": self.state,
            "model": self.spec["model"]["name"],
            "layout": job_layout(self.spec),
            "shards_total": self.shards_total,
            "shards_done": len(self.committed),
            "shards_failed": len(self.failed - self.committed),
            "images_total": int(self.spec["counts"]["prompts"]) * images_per_prompt(self.spec),
            "images_done": self.images_done,
        }


def read_progress(job_store: Store) -> Progress:
    """Which shards of a job are committed or failed, from one listing each."""
    spec = read_spec(job_store)
    progress = Progress(spec)
    for folder, into in ((METADATA, progress.committed), (FAILED, progress.failed)):
        progress.listings[folder] = listing = list(job_store.list(f"{folder}/"))
        for key, _size in listing:
            shard = shard_of_key(key)
            if shard is not None and 1 <= shard <= progress.shards_total:
                into.add(shard)
    progress.failed -= progress.committed
    return progress
