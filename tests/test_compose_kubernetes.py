"""deploy/kubernetes, validated offline (no cluster runs on the test machines).

Built-in kinds are checked, strictly (an unknown field fails), against the Kubernetes OpenAPI
schemas bundled in ``kubernetes-validate``; KEDA's ScaledObject and TriggerAuthentication
against deploy/kubernetes/schemas/keda-v2.json. Then what the manifests promise is checked:
workers with one GPU each scale on their model's queue, down to zero, and every secret comes
from the Secret.
"""

from __future__ import annotations

import copy
import json

import jsonschema
import kubernetes_validate
import pytest
import yaml

from fewstep.contract import queue_name
from fewstep.settings import defaults
from tests.conftest import REPO

DEPLOY = REPO / "deploy" / "kubernetes"
# The oldest Kubernetes still in support when this was written, and the newest bundled.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version())
KEDA_SCHEMA = json.loads((DEPLOY / "schemas" / "keda-v2.json").read_text())


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def by_kind(kind: str, name: str | None = None) -> dict:
    found = [
        d
        for path in sorted(DEPLOY.glob("*.yaml"))
        for d in documents(path.name)
        if d["kind"] == kind and (name is None or d["metadata"].get("name") == name)
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def validate_keda(doc: dict) -> None:
    schema = {**KEDA_SCHEMA, "$ref": f"#/$defs/{doc['kind']}"}
    jsonschema.Draft202012Validator(schema).validate(doc)


def container(doc: dict) -> dict:
    [only] = doc["spec"]["template"]["spec"]["containers"]
    return only


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def test_every_manifest_matches_its_schema():
    kinds = set()
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in documents(path.name):
            kinds.add(doc["kind"])
            if doc["apiVersion"].startswith("keda.sh/"):
                validate_keda(doc)
            elif doc["kind"] == "Kustomization":
                for resource in doc["resources"]:
                    assert (DEPLOY / resource).is_file(), resource
            else:
                for version in KUBERNETES_VERSIONS:
                    kubernetes_validate.validate(doc, version, strict=True)
    assert {
        "StatefulSet",
        "Service",
        "Deployment",
        "Job",
        "Secret",
        "ConfigMap",
        "ScaledObject",
        "TriggerAuthentication",
    } <= kinds


def test_the_validators_reject_a_misspelt_field():
    worker = copy.deepcopy(by_kind("Deployment", "fewstep-worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSIONS[-1], strict=True)
    scaled = copy.deepcopy(by_kind("ScaledObject"))
    scaled["spec"]["minReplicas"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_keda(scaled)
    scaled = copy.deepcopy(by_kind("ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 4  # KEDA wants strings
    with pytest.raises(jsonschema.ValidationError):
        validate_keda(scaled)


def test_workers_scale_on_their_models_queue_down_to_zero():
    worker = by_kind("Deployment", "fewstep-worker")
    scaled = by_kind("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": worker["metadata"]["name"],
    }
    assert scaled["spec"]["minReplicaCount"] == 0 and scaled["spec"]["maxReplicaCount"] >= 1
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert set(trigger["metadata"]) <= set(KEDA_SCHEMA["redisTriggerMetadata"])
    args = container(worker)["args"]
    model = args[args.index("--model") + 1]
    prefix = by_kind("ConfigMap")["data"]["FEWSTEP_QUEUE_PREFIX"]
    assert prefix == defaults()["queue"]["prefix"]
    assert trigger["metadata"]["listName"] == queue_name(prefix, model)  # the queue the worker consumes
    assert trigger["metadata"]["activationListLength"] == "0"
    service = by_kind("Service", "redis")
    assert trigger["metadata"]["address"] == (
        f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:6379"
    )
    auth = by_kind("TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "fewstep", "key": "REDIS_PASSWORD"}
    ]


def test_each_worker_has_one_gpu_runs_as_a_user_and_finishes_its_shard_on_scale_down():
    worker = by_kind("Deployment", "fewstep-worker")
    pod = worker["spec"]["template"]["spec"]
    c = container(worker)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert args_value(c["args"], "--device") == "cuda"  # the one GPU the pod was given
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/cache", "/tmp"}
    grace = defaults()["worker"]
    assert pod["terminationGracePeriodSeconds"] > grace["shutdown_grace"] + grace["shutdown_hard_exit_after"]
    assert worker["spec"]["replicas"] == 0  # KEDA owns the count


def args_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_secrets_come_from_the_secret_and_redis_needs_one():
    secret = documents("secret.example.yaml")[0]
    placeholders = {secret["stringData"][k] for k in ("REDIS_PASSWORD", "AWS_SECRET_ACCESS_KEY")}
    workloads = [by_kind("StatefulSet", "redis"), by_kind("Deployment", "fewstep-worker"), by_kind("Job")]
    for doc in workloads:
        c = container(doc)
        env = env_of(c)
        for e in env.values():
            assert e.get("value") not in placeholders, e["name"]
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
        for name in ("REDIS_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
            if name in env:
                assert "secretKeyRef" in env[name]["valueFrom"], name
        if "CELERY_BROKER_URL" in env:  # $(VAR) expands only variables defined before it
            names = [e["name"] for e in c["env"]]
            assert env["CELERY_BROKER_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
            assert names.index("REDIS_PASSWORD") < names.index("CELERY_BROKER_URL")
    for config in by_kind("ConfigMap")["data"].values():
        assert config not in placeholders
    redis_args = container(by_kind("StatefulSet", "redis"))["args"]
    assert args_value(redis_args, "--requirepass") == "$(REDIS_PASSWORD)"
    assert args_value(redis_args, "--appendonly") == "yes"
    assert args_value(redis_args, "--maxmemory-policy") == "noeviction"
    assert by_kind("Service", "redis")["spec"]["type"] == "ClusterIP"
    assert "secret.example.yaml" not in documents("kustomization.yaml")[0]["resources"]


def test_deploy_guide_covers_kubernetes():
    guide = (REPO / "docs" / "deploy.md").read_text()
    for text in ("deploy/kubernetes", "ScaledObject", "nvidia.com/gpu: 1", "no cluster"):
        assert text in guide, text
