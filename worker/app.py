"""The worker's Celery app and its one task.

The model is loaded by ``worker.cli`` before the worker starts consuming, in the
process that runs the tasks (the solo pool: nothing forks after CUDA is initialised).
"""

from __future__ import annotations

import logging

from fewstep.contract import TASK_NAME, ShardMessage
from fewstep.queue import celery_app
from fewstep.storage import StorageError
from worker.shard import ShardRunner

log = logging.getLogger("fewstep.worker")

app = celery_app()

#: Set once at start-up, before the first task.
runner: ShardRunner | None = None


@app.task(name=TASK_NAME, bind=True, max_retries=5)
def generate_shard(self, job_url: str, shard: int, manifest_key: str, attempt: int = 1) -> dict:
    """Generate, upload and commit one shard. Arguments are references only."""
    if runner is None:
        raise RuntimeError("worker started without a model")
    message = ShardMessage(job_url, shard, manifest_key, attempt)
    try:
        result = runner.run(message)
    except StorageError as e:
        # Storage stayed down through the client's own retries: try the shard later.
        log.warning("shard %s of %s: storage unavailable (%s); retrying later", shard, job_url, e)
        raise self.retry(exc=e, countdown=min(300, 10 * 2**self.request.retries)) from None
    return {"shard": result.shard, "images": result.images, "committed": result.committed}
