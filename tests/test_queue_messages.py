"""What goes to Redis: one small reference-only message per shard, JSON, no secrets."""

from __future__ import annotations

import json

from fewstep.contract import TASK_NAME
from fewstep.queue import pending_messages, queue_length, redis_client
from tests.support import cli, cli_json
from tests.test_end_to_end import SAMPLE, enqueue


def raw_messages(queue: str) -> list[bytes]:
    return redis_client().lrange(queue, 0, -1)


def test_one_small_reference_message_per_shard(env, output):
    small = enqueue(SAMPLE, "small-shards", output, env, "--shard-size", "1")
    assert small["shards"] == small["enqueued"] == 32
    client = redis_client()
    queue = small["queue"]
    assert queue_length(client, queue) == 32
    per_message = client.memory_usage(queue) / 32
    assert per_message < 2048, per_message
    raw = raw_messages(queue)
    secrets = [
        env["AWS_SECRET_ACCESS_KEY"],
        env["AWS_ACCESS_KEY_ID"],
        env["CELERY_BROKER_URL"].split("@")[0][10:],
    ]
    for message in raw:
        envelope = json.loads(message)
        assert envelope["content-type"] == "application/json"
        text = message.decode()
        assert not any(s in text for s in secrets)
        assert "bicycle" not in text  # the first prompt
    # Message size does not grow with the shard size.
    client.delete(queue)
    big = enqueue(SAMPLE, "one-big-shard", output, env, "--shard-size", "32")
    assert big["shards"] == 1
    (one,) = raw_messages(queue)
    assert abs(len(one) - max(len(m) for m in raw)) < 16


def test_pending_messages_are_recognised_and_resume_sends_nothing_twice(env, output):
    first = enqueue(SAMPLE, "resume-me", output, env, "--shard-size", "8")
    assert first["enqueued"] == 4 and not first["resumed"]
    shards = sorted(m.shard for m in pending_messages(redis_client(), first["queue"]))
    assert shards == [1, 2, 3, 4]
    again = enqueue(SAMPLE, "resume-me", output, env, "--shard-size", "8")
    assert again["resumed"] and again["enqueued"] == 0 and again["already_queued"] == 4
    # Redis flushed: the same enqueue re-sends every uncommitted shard from storage.
    redis_client().delete(first["queue"])
    third = enqueue(SAMPLE, "resume-me", output, env, "--shard-size", "8")
    assert third["enqueued"] == 4


def test_same_name_with_another_spec_is_refused(env, output):
    enqueue(SAMPLE, "taken", output, env, "--shard-size", "8")
    result = cli(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", "tiny", "--job", "taken",
        "--output", output, "--shard-size", "8", "--layout", "files", "--seed", "7", env=env, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "already exists" in result.stderr and "differs in: seed" in result.stderr


def test_dry_run_touches_neither_redis_nor_storage(env, output):
    summary = cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", "tiny", "--job", "dry",
        "--output", output, "--shard-size", "10", "--dry-run", env=env,
    )  # fmt: skip
    assert summary == {
        "job": "dry", "dry_run": True, "prompts": 32, "shards": 4, "rows_read": 32, "skipped_empty": 0,
        "skipped_invalid": 0, "skipped_filtered": 0, "duplicates": 0, "not_selected": 0,
    }  # fmt: skip
    status = cli("producer", "status", "dry", "--output", output, env=env, check=False)
    assert status.returncode != 0 and "no job at" in status.stderr


def test_foreign_or_malformed_messages_in_the_queue_are_skipped(env, output):
    """Status, reconcile and resume read the queue; something else's message must not stop them."""
    job = enqueue(SAMPLE, "among-strangers", output, env, "--shard-size", "16")
    queue, client = job["queue"], redis_client()
    foreign = [b"[1, 2, 3]", b'"a string"', b"42", b"null", b"not json", b'{"headers": []}']
    ours_broken = json.dumps(
        {
            "headers": {"task": TASK_NAME},
            "content-type": "application/json",
            "properties": {},
            "body": json.dumps([[], ["kwargs", "not", "a", "dict"], {}]),
        }
    ).encode()
    client.lpush(queue, *foreign, ours_broken)
    unacked = {f"stranger-{i}": json.dumps([raw.decode(), "", queue]) for i, raw in enumerate(foreign)}
    unacked["stranger-shape"] = b"[1]"
    client.hset("unacked", mapping=unacked)
    try:
        assert sorted(m.shard for m in pending_messages(client, queue)) == [1, 2]
    finally:
        client.hdel("unacked", *unacked)
        client.delete(queue)
