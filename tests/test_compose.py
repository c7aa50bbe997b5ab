"""docker-compose.yml, checked statically (no Docker engine runs on the test machines)."""

from __future__ import annotations

import yaml

from tests.conftest import REPO


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_redis_persists_and_needs_a_password():
    redis = compose()["services"]["redis"]
    assert "--appendonly yes" in redis["command"]
    assert "--requirepass" in redis["command"]
    assert "noeviction" in redis["command"]
    assert all(p.startswith("${BIND_ADDRESS:-127.0.0.1}:") for p in redis["ports"])


def test_worker_reserves_a_gpu_and_scales():
    worker = compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N
    assert worker["command"][:2] == ["worker", "--model"]
    assert any(v.endswith(":/cache") for v in worker["volumes"])


def test_services_get_settings_from_env_and_minio_gets_a_bucket():
    services = compose()["services"]
    assert {"redis", "minio", "create-bucket", "worker", "producer"} <= set(services)
    env = services["worker"]["environment"]
    assert env["CELERY_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
    assert env["AWS_SECRET_ACCESS_KEY"].startswith("${AWS_SECRET_ACCESS_KEY")
    assert "mc mb" in " ".join(services["create-bucket"]["entrypoint"])
    assert services["worker"]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
