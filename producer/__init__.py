"""The producer: prompt sets → shards → manifests in storage + one Celery task per shard.

Reading order: ``sources/`` (a prompt set as Arrow batches) → ``sharding`` (rows into
shard manifests, seeds) → ``enqueue`` (job spec, tasks) → ``progress`` (status from storage).
The producer never imports torch.
"""
