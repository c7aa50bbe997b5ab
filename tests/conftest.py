"""Session fixtures: a real redis-server and a real SeaweedFS on 127.0.0.1 with
credentials, started once per test session and stopped at the end. Workers are real
processes (``python -m worker``). Nothing is faked: no in-memory stand-ins for Redis or S3,
no Celery eager mode.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from fewstep import services

# Before anything imports huggingface_hub or diffusers (both read it at import): never the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
PARTI = Path(os.environ.get("FEWSTEP_PARTIPROMPTS") or REPO.parent / "shared" / "data" / "PartiPrompts.tsv")
BUCKET = "fewstep-test"


@pytest.fixture(scope="session")
def parti_path() -> Path:
    """The real PartiPrompts file, which lives outside the project (never copied in)."""
    if not PARTI.is_file():
        pytest.skip(
            f"real PartiPrompts file not available at {PARTI} "
            "(it lives in the developers' ../shared/data; set FEWSTEP_PARTIPROMPTS to a copy)"
        )
    return PARTI


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def local_services(tmp_path_factory):
    svc = services.start(tmp_path_factory.mktemp("services"), [BUCKET, "fewstep-other"])
    yield svc
    svc.stop()


@pytest.fixture
def env(local_services, model_cache, monkeypatch) -> dict[str, str]:
    """Environment pointing at the session's services, with a queue prefix of this test's own
    (so tests never see each other's tasks). Also applied to this process."""
    values = {
        **local_services.env(),
        "HF_HUB_OFFLINE": "1",
        "FEWSTEP_MODEL_CACHE": str(model_cache),
        "FEWSTEP_QUEUE_PREFIX": "t" + uuid.uuid4().hex[:10],
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


@pytest.fixture
def output() -> str:
    """A fresh output prefix in the test bucket."""
    return f"s3://{BUCKET}/runs/{uuid.uuid4().hex[:8]}"
