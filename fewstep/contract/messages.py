"""The shard message (one Celery task's body: references only, never prompts or credentials),
its queue, and the states an attempt record of its delivery can be in."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from fewstep.contract.keys import part_name

log = logging.getLogger("fewstep.contract")


TASK_NAME = "fewstep.generate_shard"


#: The largest shard id (and attempt round) a message may carry: far above any real job.
MAX_SHARD = 10**9


# The state of an attempt record. A worker writes "running" when a delivery starts and
# overwrites it with the outcome; a record still "running" when the shard comes back was
# abandoned (its worker was killed or lost). `producer retry` writes "retry_requested",
# after which earlier failures no longer count.
ATTEMPT_RUNNING = "running"
ATTEMPT_COMMITTED = "committed"
ATTEMPT_SUPERSEDED = "superseded"  # another attempt committed first; this one stopped
ATTEMPT_INTERRUPTED = "interrupted"  # the worker shut down; the shard went back to the queue
ATTEMPT_STORAGE_UNAVAILABLE = "storage_unavailable"  # tried again later, not counted as a failure
ATTEMPT_ERROR = "error"
ATTEMPT_RETRY_REQUESTED = "retry_requested"


def queue_name(prefix: str, model: str) -> str:
    """Each model has its own queue, so a worker only receives shards it can run."""
    return f"{prefix}.{model}"


@dataclass(frozen=True)
class ShardMessage:
    """The body of one Celery task: references only."""

    job_url: str
    shard: int
    manifest_key: str
    attempt: int = 1

    def to_kwargs(self) -> dict[str, Any]:
        """The task's kwargs (JSON): the inverse of :meth:`from_kwargs`."""
        return asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> ShardMessage:
        """The message of a task's kwargs; :class:`ValueError` naming what is wrong if malformed."""
        if not isinstance(kwargs, dict):
            raise ValueError(f"kwargs are a {type(kwargs).__name__}, not a dict")
        missing = [k for k in ("job_url", "shard", "manifest_key") if k not in kwargs]
        if missing:
            raise ValueError(f"kwargs lack {', '.join(missing)}")
        job_url, shard = kwargs["job_url"], kwargs["shard"]
        manifest, attempt = kwargs["manifest_key"], kwargs.get("attempt", 1)
        for name, value in (("job_url", job_url), ("manifest_key", manifest)):
            if not isinstance(value, str) or not value or len(value) > 2048:
                raise ValueError(f"{name} is not a non-empty string of at most 2048 characters")
        if not job_url.startswith(("s3://", "file:///")):  # what enqueue writes: never a relative path
            raise ValueError("job_url is neither s3://... nor file:///...")
        for name, value in (("shard", shard), ("attempt", attempt)):
            # bool is an int in Python; JSON gives true/false for it.
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SHARD:
                raise ValueError(f"{name} is not an integer from 1 to {MAX_SHARD}")
        return cls(job_url, shard, manifest, attempt)

    @classmethod
    def parse(cls, kwargs: Any) -> ShardMessage | None:
        """The message of a task's kwargs, or None (logged at debug level) if malformed."""
        try:
            return cls.from_kwargs(kwargs)
        except ValueError as e:
            log.debug("malformed shard message skipped: %s", e)
            return None

    @property
    def task_id(self) -> str:
        """Deterministic, so a queued shard can be recognised without reading its body."""
        return f"{self.job_url}#{part_name(self.shard)}#{self.attempt}"
