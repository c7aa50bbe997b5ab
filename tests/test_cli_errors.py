"""User errors: one clear line naming the problem, a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import redis
from kombu.exceptions import OperationalError

from tests.conftest import BUCKET
from tests.support import cli
from tests.test_end_to_end import SAMPLE


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def enqueue(env, *args: str, path: str = str(SAMPLE), model: str = "tiny", output: str | None = None):
    return cli(
        "producer", "enqueue", "partiprompts", "--path", path, "--model", model, "--job", "errors",
        "--output", output or f"s3://{BUCKET}/errors", *args, env=env, check=False,
    )  # fmt: skip


def test_missing_file(env, tmp_path):
    assert_one_line_error(enqueue(env, path=str(tmp_path / "nope.tsv")), "not found", "nope.tsv")


def test_missing_columns(env, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nhello\tx\n")
    assert_one_line_error(enqueue(env, path=str(bad)), "bad.tsv", "missing column(s) Prompt")


def test_unknown_model(env):
    assert_one_line_error(enqueue(env, model="no-such-model"), "unknown model 'no-such-model'")


def test_invalid_job_name(env):
    result = cli(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", "tiny", "--job", "../up",
        "--output", f"s3://{BUCKET}/x", env=env, check=False,
    )  # fmt: skip
    assert_one_line_error(result, "invalid job name")


def test_unreachable_redis(env):
    result = enqueue({**env, "CELERY_BROKER_URL": "redis://127.0.0.1:9/0"})
    assert_one_line_error(result, "cannot reach Redis at redis://127.0.0.1:9/0")


def test_wrong_redis_password_is_not_echoed(env, local_services):
    url = f"redis://:wrongpass@127.0.0.1:{local_services.redis_port}/0"
    result = enqueue({**env, "CELERY_BROKER_URL": url})
    assert_one_line_error(result, "Redis at redis://:***@127.0.0.1")
    assert "wrongpass" not in result.stderr


def test_unreachable_s3(env):
    result = enqueue({**env, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"})
    assert_one_line_error(result, "cannot reach S3 at http://127.0.0.1:9")


def test_missing_bucket(env):
    result = enqueue(env, output="s3://no-such-bucket/jobs")
    assert_one_line_error(result, "bucket 'no-such-bucket' does not exist")


def test_wrong_s3_credentials_are_not_echoed(env):
    result = enqueue({**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert_one_line_error(result, "rejected the credentials")
    assert "not-the-secret" not in result.stderr


def test_status_of_unknown_job(env):
    result = cli("producer", "status", "never-enqueued", "--output", f"s3://{BUCKET}/x", env=env, check=False)
    assert_one_line_error(result, "no job at s3://fewstep-test/x/never-enqueued")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "tiny", "--device", "tpu"], "unknown device 'tpu'"),
        ([], "--model is required"),
    ],
)
def test_worker_user_errors(env, args, fragment):
    assert_one_line_error(cli("worker", *args, env=env, check=False), fragment)


def test_worker_refuses_a_read_ahead_setting_other_than_0_or_1(env):
    result = cli("worker", "--model", "tiny", env={**env, "FEWSTEP_READ_AHEAD": "yes"}, check=False)
    assert_one_line_error(result, "FEWSTEP_READ_AHEAD must be 0 or 1, not 'yes'")


def test_worker_with_unreachable_redis(env):
    result = cli(
        "worker", "--model", "tiny", env={**env, "CELERY_BROKER_URL": "redis://127.0.0.1:9/0"}, check=False
    )
    assert_one_line_error(result, "cannot reach Redis at redis://127.0.0.1:9/0")


def test_missing_output_names_fewstep_output(env):
    bare = {k: v for k, v in env.items() if k != "FEWSTEP_OUTPUT"}
    result = cli("producer", "finalize", "parti", env=bare, check=False)
    assert_one_line_error(result, "no output location: pass --output", "set FEWSTEP_OUTPUT")


def test_file_source_points_an_image_format_to_image_format(env, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    result = cli(
        "producer", "enqueue", "file", str(tmp_path / "p.txt"), "--format", "jpeg", "--model", "tiny",
        "--job", "x", "--output", str(tmp_path / "out"), env=env, check=False,
    )  # fmt: skip
    assert_one_line_error(result, "--format jpeg", "the images' format is --image-format jpeg")


def test_services_env_prints_fewstep_output_and_works_from_any_directory(tmp_path):
    from click.testing import CliRunner

    from fewstep import services
    from fewstep.cli import cli as fewstep_cli

    state = tmp_path / "svc"
    started = services.start(state, ["fewstep"])
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        result = subprocess.run(
            [sys.executable, "-m", "fewstep", "services", "env"], cwd=elsewhere, text=True,
            capture_output=True, env={**os.environ, "FEWSTEP_SERVICES_DIR": str(state)},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "export FEWSTEP_OUTPUT=s3://fewstep/jobs" in result.stdout
        assert f"export AWS_ENDPOINT_URL_S3={started.s3_endpoint}" in result.stdout
        # The default state directory does not depend on the current one.
        default = CliRunner().invoke(fewstep_cli, ["services", "env", "--help"]).output
        assert "~/.local/state/fewstep/services" in default
    finally:
        started.stop()


@pytest.mark.parametrize(
    "error",
    [
        redis.ConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused."),
        redis.TimeoutError("Timeout reading from socket"),
        OperationalError("Error 111 connecting to redis://:s3cret-pass@127.0.0.1:6390/0."),
    ],
)
def test_redis_lost_in_the_middle_of_a_command_is_one_line_without_the_password(error):
    # A command that passed its first broker check and then lost Redis (a restart mid-reconcile,
    # seen in the chaos soak) ends as a user error does; run in a child process, as the CLI is.
    script = (
        "import click, pickle, sys\n"
        "from fewstep import console\n"
        "error = pickle.loads(sys.stdin.buffer.read())\n"
        "@click.command()\n"
        "def command():\n"
        "    raise error\n"
        "console.run(command)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], input=pickle.dumps(error), capture_output=True, timeout=60
    )
    result.stderr = result.stderr.decode()
    assert_one_line_error(result, "lost the connection to Redis during the command", "run it again")
    assert "s3cret-pass" not in result.stderr and result.returncode == 1
