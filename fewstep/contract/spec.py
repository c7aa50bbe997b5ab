"""The job spec (``job.json``): what makes two enqueues the same job, and what it says of its shards."""

from __future__ import annotations

from typing import Any

from fewstep.contract.keys import LAYOUT_FILES


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
)


def spec_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """The parts of ``spec`` that say what the job produces (:data:`SPEC_IDENTITY_KEYS`)."""
    return {k: spec.get(k) for k in SPEC_IDENTITY_KEYS}


def shard_rows(spec: dict[str, Any], shard: int) -> int:
    """Rows in a shard: every shard is full but the last."""
    total, size = spec["counts"]["prompts"], spec["shard_size"]
    shards = spec["counts"]["shards"]
    if not 1 <= shard <= shards:
        raise ValueError(f"shard {shard} out of range 1..{shards}")
    return size if shard < shards else total - size * (shards - 1)
