"""The worker: one pinned model per process, shards in, images + metadata out.

Reading order: ``cli`` (start-up: load the model once, then consume) → ``app`` (the Celery
task) → ``shard`` (manifest → generate → encode → upload → commit) with ``model``
(preset → pipeline → images), ``batching`` (batch size per resolution, out-of-memory
retries) and ``encode`` (pixels → PNG/JPEG/WebP bytes).
"""
