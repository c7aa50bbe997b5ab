"""Operations faults (issue 11, item 4): shutdown with services gone, isolation between jobs,
malformed messages, a job recreated under the same name.

Real redis-server, SeaweedFS and worker processes, as in tests/test_faults.py. Scenarios that
stop a service start their own (the session's are shared by every test).
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import time
import uuid

import pytest

from fewstep import services
from fewstep.contract import TASK_NAME, ShardMessage, derive_seeds
from fewstep.queue import peek_next, pending_messages, redis_client
from fewstep.storage import open_store
from tests.support import cli_json, committed_metadata, config_dir, start_worker, wait_done, wait_for
from tests.test_end_to_end import SAMPLE, enqueue
from tests.test_faults import half_written, log_text

# --- (p) SIGTERM with the broker and/or storage gone ---------------------------------------

GRACE = 4
#: ``[worker] shutdown_hard_exit_after`` for these tests: the watchdog's margin after the grace.
HARD_EXIT_AFTER = 10
#: Process exit and the test's polling, on a loaded CI machine.
SLACK = 5


@pytest.fixture
def own_services(env, tmp_path, monkeypatch):
    """A Redis and a SeaweedFS of this test's own (it stops them), with the env pointing at them."""
    svc = services.start(tmp_path / "svc", ["fewstep-own"])
    for key, value in svc.env().items():
        monkeypatch.setenv(key, value)
    try:
        yield svc, {**env, **svc.env()}
    finally:
        svc.stop()


@pytest.mark.parametrize("down", ["broker and storage", "broker", "storage"])
def test_p_sigterm_ends_a_worker_within_its_grace_whatever_is_down(own_services, tmp_path, down):
    svc, env = own_services
    env["FEWSTEP_CONFIG_DIR"] = config_dir(tmp_path, worker={"shutdown_hard_exit_after": HARD_EXIT_AFTER})
    output = "s3://fewstep-own/runs"
    job = enqueue(SAMPLE, "stop-me", output, env, "--shard-size", "8", "--limit", "16", "--steps", "24")
    log = tmp_path / "worker.log"
    worker = start_worker(env, "--shutdown-grace", str(GRACE), "--batch-size", "1", log_path=log)
    try:
        wait_for(lambda: half_written(job["job_url"]), 240, "the worker to be in the middle of a shard")
        if "broker" in down:
            svc.stop_redis()
        if "storage" in down:
            svc.stop_weed()
        time.sleep(1)  # let the worker run into the outage
        start = time.monotonic()
        worker.terminate()
        try:
            worker.wait(timeout=GRACE + HARD_EXIT_AFTER + SLACK)
        except Exception:
            raise AssertionError(f"worker alive {time.monotonic() - start:.0f}s after SIGTERM") from None
        took = time.monotonic() - start
    finally:
        worker.kill()
    assert took <= GRACE + HARD_EXIT_AFTER + SLACK, log_text(log)[-3000:]
    if down == "storage":
        # The broker is there: the shard is back on the queue (rejected) or, when the watchdog
        # ended a worker stuck in botocore's own retries, still in ``unacked`` for recovery.
        assert sorted(m.shard for m in pending_messages(redis_client(), job["queue"])) == [1, 2]


# --- (n) one job's storage trouble never stalls another's ----------------------------------


def test_n_held_back_attempt_records_are_flushed_per_store_and_never_raise(env, output, tmp_path):
    """Records held back for a store that is still unusable never keep another store's from being
    written, and flushing never raises (it runs before every task, whatever job that task is for)."""
    from worker import commit

    good = open_store(output)
    (tmp_path / "not-a-folder").write_text("")
    gone = open_store(str(tmp_path / "not-a-folder" / "job"))  # every write fails
    commit._unwritten[:] = [
        (gone, "attempts/part-000001/a.json", {"n": 1}),
        (good, "attempts/part-000001/b.json", {"n": 2}),
        (gone, "attempts/part-000002/c.json", {"n": 3}),
    ]
    try:
        start = time.monotonic()
        commit.flush_unwritten()
        assert time.monotonic() - start < 5  # no retries
        assert json.loads(good.get("attempts/part-000001/b.json")) == {"n": 2}
        assert [key for _, key, _ in commit._unwritten] == [
            "attempts/part-000001/a.json",
            "attempts/part-000002/c.json",
        ]
    finally:
        commit._unwritten.clear()


# --- (o) malformed and foreign messages -------------------------------------------------------


def _envelope(body: object, *, task: object = TASK_NAME, encoding: str = "base64", raw_body=None) -> dict:
    text = json.dumps(body) if raw_body is None else raw_body
    return {
        "body": base64.b64encode(text.encode()).decode() if encoding == "base64" else text,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": uuid.uuid4().hex, "retries": 0},
        "properties": {
            "body_encoding": encoding,
            "delivery_tag": uuid.uuid4().hex,
            "delivery_info": {"exchange": "", "routing_key": "x"},
            "priority": 0,
        },
    }


#: Fuzz kinds that break the kombu envelope itself rather than fewstep's body (see below).
ENVELOPE_KINDS = (4, 5, 7)


def fuzz_messages(rng: random.Random, count: int, good: dict, kinds: range | tuple = range(9)) -> list[bytes]:
    """Raw queue entries of every wrong shape, most with fewstep's task name, made by breaking
    the kwargs ``good`` (seeded, bounded; a few come out well-formed, duplicates of ``good``)."""
    values = [None, True, 0, -1, 10**30, 2**63, 1.5, "", "x" * 3000, [], {}, [1], {"a": 1}, "1", "../../etc"]
    out: list[bytes] = []
    for _ in range(count):
        kind = rng.choice(kinds)
        kwargs = dict(good)
        if kind == 0:  # a key missing
            kwargs.pop(rng.choice(list(kwargs)))
            body = [[], kwargs, {}]
        elif kind == 1:  # a value of a wrong type or range
            kwargs[rng.choice([*kwargs, "attempt"])] = rng.choice(values)
            body = [[], kwargs, {}]
        elif kind == 2:  # kwargs not a dict / body of another shape
            body = rng.choice(
                [[[], rng.choice(values), {}], rng.choice(values), [kwargs], [[1, 2], kwargs, {}]]
            )
        elif kind == 3:  # body not JSON, or not base64
            out.append(json.dumps(_envelope(None, raw_body=rng.choice(["{", "\xff", "nan]", ""]))).encode())
            continue
        elif kind == 4:
            envelope = _envelope([[], kwargs, {}])
            envelope["body"] = "!!not base64!!"
            out.append(json.dumps(envelope).encode())
            continue
        elif kind == 5:  # headers of the wrong shape
            envelope = _envelope([[], kwargs, {}])
            envelope["headers"] = rng.choice([None, [], "x", {"task": None}, {"task": 7}])
            out.append(json.dumps(envelope).encode())
            continue
        elif kind == 6:  # another app's task
            out.append(json.dumps(_envelope([[], kwargs, {}], task="someone.else")).encode())
            continue
        elif kind == 7:  # not an envelope at all
            out.append(rng.choice([b"[1, 2, 3]", b'"a string"', b"42", b"null", b"{}", b'{"body": 1}']))
            continue
        else:  # a plain-text body with fewstep's name
            out.append(json.dumps(_envelope([[], kwargs, {}], encoding="utf-8")).encode())
            continue
        out.append(json.dumps(_envelope(body)).encode())
    return out


BODY_KINDS = tuple(k for k in range(9) if k not in ENVELOPE_KINDS)


def test_o_fuzzed_messages_never_crash_readers_or_the_worker(env, output, tmp_path):
    job = enqueue(SAMPLE, "fuzzed", output, env, "--shard-size", "8", "--limit", "16")
    queue, client = job["queue"], redis_client()
    valid = client.lrange(queue, 0, -1)
    shard_1 = min(pending_messages(client, queue), key=lambda m: m.shard)
    garbage = fuzz_messages(random.Random(11), 150, shard_1.to_kwargs())
    # What the worker consumes: kombu's Redis transport itself dies on a broken envelope (below).
    consumed = fuzz_messages(random.Random(13), 100, shard_1.to_kwargs(), BODY_KINDS)
    client.delete(queue)
    mixed = consumed + valid
    random.Random(12).shuffle(mixed)
    client.lpush(queue, *mixed)
    client.lpush(f"{queue}.fuzz", *garbage)  # readers only
    unacked = {
        f"fuzz-{secrets.token_hex(4)}": json.dumps([raw.decode(errors="replace"), "", queue])
        for raw in garbage
    }
    unacked["fuzz-shape"] = b"[1]"
    unacked["fuzz-text"] = b"\xff\xfe"
    client.hset("unacked", mapping=unacked)
    try:
        assert {m.shard for m in pending_messages(client, queue)} == {1, 2}
        peeked = peek_next(client, queue)
        assert peeked is None or isinstance(peeked, ShardMessage)
        found = list(pending_messages(client, f"{queue}.fuzz"))  # every shape, envelopes too
        assert {(m.job_url, m.shard) for m in found} <= {(job["job_url"], 1)}  # only the good ones
        assert peek_next(client, f"{queue}.fuzz") in (None, *found)
        status = cli_json("producer", "status", "fuzzed", "--output", output, env=env)
        assert status["state"] != "done"
        reconciled = cli_json("producer", "reconcile", "fuzzed", "--output", output, env=env)
        assert (reconciled["enqueued"], reconciled["already_queued"]) == (0, 2)
    finally:
        client.hdel("unacked", *unacked)
        client.delete(f"{queue}.fuzz")
    log = tmp_path / "worker.log"
    worker = start_worker(env, "--exit-when-idle", "3", log_path=log)
    try:
        wait_done("fuzzed", output, env, timeout=180)
        assert worker.wait(timeout=120) == 0, log_text(log)[-3000:]
    finally:
        worker.kill()
    text = log_text(log)
    assert "Unrecoverable error" not in text, text[-3000:]
    assert "dropped a malformed" in text


# --- a job deleted and created again under the same name ---------------------------------------


def test_a_job_recreated_under_the_same_name_runs_with_its_new_spec(env, output, tmp_path):
    worker = start_worker(env, log_path=tmp_path / "worker.log")  # one worker: its spec cache is tested
    try:
        first = enqueue(SAMPLE, "reborn", output, env, "--shard-size", "4", "--limit", "4")
        wait_done("reborn", output, env)
        assert set(committed_metadata(first["job_url"]).column("step").to_pylist()) == {1}
        store = open_store(first["job_url"])
        for key, _ in list(store.list()):
            store.delete(key)
        second = enqueue(
            SAMPLE, "reborn", output, env, "--shard-size", "4", "--limit", "4", "--seed", "7", "--steps", "2"
        )
        assert second["job_url"] == first["job_url"] and not second["resumed"]
        wait_done("reborn", output, env)
    finally:
        worker.kill()
    table = committed_metadata(second["job_url"])
    assert set(table.column("step").to_pylist()) == {2}
    expected = derive_seeds(7, table.column("source_row").to_pylist()).tolist()
    assert table.column("seed").to_pylist() == expected


def test_o_a_broken_envelope_never_stops_the_worker(env, tmp_path):
    queue, client = f"{env['FEWSTEP_QUEUE_PREFIX']}.tiny", redis_client()
    good = {"job_url": "s3://fewstep-test/nowhere/job", "shard": 1, "manifest_key": "manifests/x.parquet"}
    client.lpush(queue, *fuzz_messages(random.Random(14), 10, good, ENVELOPE_KINDS))
    log = tmp_path / "worker.log"
    worker = start_worker(env, "--exit-when-idle", "2", log_path=log)
    try:
        assert worker.wait(timeout=120) == 0 and "Unrecoverable" not in log_text(log)
    finally:
        worker.kill()
