"""The job spec (``job.json``): what makes two enqueues the same job, and what it says of its shards."""

from __future__ import annotations

from typing import Any

from fewstep.contract.keys import LAYOUT_FILES
from fewstep.contract.rank import images_per_prompt


def job_layout(spec: dict[str, Any]) -> str:
    """The layout a job spec records ("files" for jobs written before layouts existed)."""
    return spec.get("layout") or LAYOUT_FILES


def job_saves_control(spec: dict[str, Any]) -> bool:
    """Whether a job stores each row's control map beside its image (``--save-control``)."""
    return bool((spec.get("conditioning") or {}).get("save_control"))


# The parts of job.json that define what a job produces. Two enqueues with equal
# identities are the same job (a resume); a different one under the same name is refused.
SPEC_IDENTITY_KEYS = (
    "format_version",
    "source",
    "model",
    "generation",
    "seed",
    "shard_size",
    "layout",
    "scoring",
    "conditioning",
    "candidates",
)


def spec_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """The parts of ``spec`` that say what the job produces (:data:`SPEC_IDENTITY_KEYS`)."""
    return {k: spec.get(k) for k in SPEC_IDENTITY_KEYS}


def job_rounds(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's prompt rounds: the enqueue (round 0) and each ``producer topup`` round, each
    with ``round``, ``first_shard``, ``shards``, ``first_row`` and ``prompts``. ``counts`` holds
    the totals of all rounds."""
    topups = list(spec.get("rounds") or [])
    counts = spec["counts"]
    first = {
        "round": 0,
        "first_shard": 1,
        "shards": int(counts["shards"]) - sum(int(r["shards"]) for r in topups),
        "first_row": 0,
        "prompts": int(counts["prompts"]) - sum(int(r["prompts"]) for r in topups),
    }
    return [first, *topups]


def shard_prompts(spec: dict[str, Any], shard: int) -> int:
    """Manifest rows (prompts) in a shard: every shard of a round is full but its last."""
    size = spec["shard_size"]
    for r in job_rounds(spec):
        local = shard - int(r["first_shard"]) + 1
        if 1 <= local <= int(r["shards"]):
            return size if local < int(r["shards"]) else int(r["prompts"]) - size * (int(r["shards"]) - 1)
    raise ValueError(f"shard {shard} out of range 1..{spec['counts']['shards']}")


def shard_rows(spec: dict[str, Any], shard: int) -> int:
    """Metadata rows (images stored) in a shard: its prompts, times K with ``--keep all``."""
    return shard_prompts(spec, shard) * images_per_prompt(spec)
