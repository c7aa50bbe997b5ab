"""Only presets that can run real jobs are enqueueable by default.

``synthetic`` (benchmarks only, no real images) needs an explicit opt-in
(``--allow-synthetic`` or ``FEWSTEP_ALLOW_SYNTHETIC=1``); a preset marked ``unavailable``
in ``config/models.toml`` is refused with its reason, by ``producer enqueue`` and by
``worker --model``, and listed as such by ``worker models``. A refusal is one line, a
non-zero exit, and leaves nothing behind: no task in Redis, no ``job.json`` in storage.
"""

from __future__ import annotations

from fewstep.contract import JOB_SPEC_KEY, queue_name
from fewstep.presets import ALLOW_SYNTHETIC_ENV, presets
from fewstep.queue import pending_messages, redis_client
from fewstep.settings import queue_prefix
from fewstep.storage import open_store
from tests.support import cli
from tests.test_cli_errors import assert_one_line_error
from tests.test_end_to_end import SAMPLE

UNAVAILABLE = "pixart-alpha-dmd-512"  # a pickle with no pinned sha256


def enqueue(env, output: str, model: str, *extra: str):
    return cli(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", model, "--job", "gate",
        "--output", output, "--limit", "4", "--shard-size", "2", "--json", *extra, env=env, check=False,
    )  # fmt: skip


def assert_nothing_queued(output: str, model: str) -> None:
    """No task for ``model`` in Redis (waiting or delivered) and no job spec in storage."""
    assert list(pending_messages(redis_client(), queue_name(queue_prefix(), model))) == []
    job = open_store(output).child("gate")
    assert not job.exists(JOB_SPEC_KEY)
    assert list(job.list()) == []  # not even a manifest


def test_enqueue_refuses_synthetic_without_opt_in_and_queues_nothing(env, output):
    result = enqueue(env, output, "synthetic")
    assert_one_line_error(result, "model synthetic is for benchmarks only", "--allow-synthetic")
    assert result.returncode == 2
    assert_nothing_queued(output, "synthetic")
    # A dry run is refused the same way: the same spec is built.
    assert_one_line_error(enqueue(env, output, "synthetic", "--dry-run"), "for benchmarks only")


def test_enqueue_takes_synthetic_with_the_flag_or_the_environment(env, output):
    assert enqueue(env, output, "synthetic", "--allow-synthetic").returncode == 0
    # The second run resumes the same job: accepted through the environment variable.
    resumed = enqueue({**env, ALLOW_SYNTHETIC_ENV: "1"}, output, "synthetic")
    assert resumed.returncode == 0, resumed.stderr
    assert len(list(pending_messages(redis_client(), queue_name(queue_prefix(), "synthetic")))) == 2


def test_enqueue_refuses_an_unavailable_preset_with_its_reason(env, output):
    reason = presets()[UNAVAILABLE]["unavailable"]
    result = enqueue(env, output, UNAVAILABLE, "--allow-synthetic")  # the opt-in does not apply
    assert_one_line_error(result, f"model {UNAVAILABLE} is unavailable: {reason}")
    assert result.returncode == 2
    assert_nothing_queued(output, UNAVAILABLE)


def test_worker_refuses_an_unavailable_preset_in_one_line(env):
    result = cli("worker", "--model", UNAVAILABLE, "--device", "cpu", env=env, check=False, timeout=60)
    assert_one_line_error(result, f"model {UNAVAILABLE} is unavailable", "pickle")
    assert result.returncode == 2


def test_worker_models_shows_why_a_preset_is_unavailable(env):
    out = cli("worker", "models", env=env).stdout
    table, _, notes = out.partition("\n\n")
    status = {line.split()[0]: line.split()[6] for line in table.splitlines()[1:]}
    assert status[UNAVAILABLE] == "unavailable"
    assert status["synthetic"] == "benchmarks-only"
    assert status["tiny"] == status["sdxl-turbo"] == "available"
    assert f"model {UNAVAILABLE} is unavailable: {presets()[UNAVAILABLE]['unavailable']}" in notes
