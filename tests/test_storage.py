"""Storage against a real SeaweedFS (with credentials) and a local directory."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid

import pytest

from fewstep import UserError
from fewstep.storage import KeyMissing, LocalStore, StorageError, open_store
from tests.conftest import BUCKET


@pytest.fixture(params=["s3", "local"])
def store(request, env, tmp_path):
    if request.param == "s3":
        return open_store(f"s3://{BUCKET}/storage-{uuid.uuid4().hex[:8]}")
    return LocalStore(tmp_path / "out")


def test_put_get_list_exists_delete(store):
    assert store.put("a/b.txt", b"one")
    assert store.get("a/b.txt") == b"one"
    assert store.exists("a/b.txt") and not store.exists("a/c.txt")
    store.put("a/b.txt", b"two")  # plain puts overwrite
    store.put("z.bin", b"xyz")
    assert sorted(store.list()) == [("a/b.txt", 3), ("z.bin", 3)]
    assert list(store.list("a/")) == [("a/b.txt", 3)]
    store.delete("a/b.txt")
    with pytest.raises(KeyMissing):
        store.get("a/b.txt")


def test_conditional_put_writes_only_once(store):
    assert store.put("marker", b"first", if_absent=True) is True
    assert store.put("marker", b"second", if_absent=True) is False
    assert store.get("marker") == b"first"


def test_child_stores_nest(store):
    child = store.child("job")
    child.put("job.json", b"{}")
    assert store.get("job/job.json") == b"{}"
    assert child.url == store.url + "/job"


@pytest.mark.parametrize("key", ["../x", "a/../b", "/abs", "a\x00b"])
def test_unsafe_keys_are_refused(store, key):
    with pytest.raises(ValueError):
        store.put(key, b"x")


def test_anonymous_requests_are_refused(local_services, env):
    store = open_store(f"s3://{BUCKET}/anon")
    store.put("secret.txt", b"x")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{local_services.s3_endpoint}/{BUCKET}/anon/secret.txt", timeout=5)
    assert e.value.code == 403


def test_missing_bucket_is_a_user_error(env):
    with pytest.raises(UserError, match=r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:"):
        open_store("s3://no-such-bucket/x").check()


def test_wrong_credentials_are_a_user_error(env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(UserError, match="rejected the credentials") as e:
        open_store(f"s3://{BUCKET}/x").check()
    assert "wrong-secret" not in str(e.value)


def test_unreachable_endpoint_names_the_url(env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    with pytest.raises((UserError, StorageError), match=r"cannot reach S3 at http://127.0.0.1:9"):
        open_store(f"s3://{BUCKET}/x", max_attempts=1).check()
