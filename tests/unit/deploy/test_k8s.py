"""deploy/k8s: the manifests render, reference what exists, and match the config schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import PurePosixPath
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from service.cli.health_cmd import DEPENDENCIES, cmd_health
from service.config import Config, load
from tests.unit.deploy.manifests import (
    DEPLOY,
    assert_production,
    cli_args,
    config_paths,
    env_read_by_service,
    image_files,
    load_yaml,
    probe_args,
    under,
)

HERE = DEPLOY / "k8s"


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    (doc,) = load_yaml(HERE / "kustomization.yaml")
    return dict(doc)


@pytest.fixture(scope="module")
def objects(kustomization: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for resource in kustomization["resources"]:
        for doc in load_yaml(HERE / resource):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


@pytest.fixture(scope="module")
def pod(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return dict(objects[("Deployment", "medvault")]["spec"]["template"]["spec"])


@pytest.fixture(scope="module")
def config() -> Config:
    return load(HERE / "config.toml")


def _secrets() -> dict[str, set[str]]:
    """The Secrets secret.example.yaml describes: name -> keys."""
    return {d["metadata"]["name"]: set(d["stringData"])
            for d in load_yaml(HERE / "secret.example.yaml")}  # fmt: skip


def test_every_yaml_in_deploy_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        assert load_yaml(path), f"{path.name}: empty"


def test_kustomize_renders_the_config_file_verbatim(kustomization: dict[str, Any]) -> None:
    """``kubectl kustomize`` (offline) when kubectl is installed; the generator's file
    exists either way."""
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["config.toml"]
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        assert (HERE / "config.toml").is_file()
        return
    run = subprocess.run([kubectl, "kustomize", str(HERE)], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    rendered = [d for d in yaml.safe_load_all(run.stdout) if d["kind"] == "ConfigMap"]
    assert rendered[0]["data"]["config.toml"] == (HERE / "config.toml").read_text()


def test_deployment_runs_serve_on_the_configmap(
    pod: dict[str, Any], objects: dict[tuple[str, str], dict[str, Any]]
) -> None:
    deployment = objects[("Deployment", "medvault")]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (container,) = pod["containers"]
    args = cli_args(container["args"])
    assert args.command == "serve"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(m["name"] for m in mounts.values()) <= set(volumes)
    config_mount = mounts[args.config]
    assert volumes[config_mount["name"]]["configMap"]["name"] == "medvault-config"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        for (k, _), doc in objects.items():
            if k == kind:
                selector = doc["spec"]["selector"]
                selector = selector.get("matchLabels", selector)
                assert selector.items() <= labels.items(), f"{kind} selects no pod"


def test_every_file_the_config_names_is_mounted(pod: dict[str, Any], config: Config) -> None:
    """The important check: config.toml (the ConfigMap), loaded by the real loader, names
    only files the pod mounts, ports the pod declares, and no secret in the file."""
    (container,) = pod["containers"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for key, path in config_paths(config).items():
        assert under(path, mounts | image_files()), f"{key} = {path} is not mounted"
    assert str(PurePosixPath(config.keystore.module).parents[1]) in mounts  # the hostPath
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(config.server.listen.rsplit(":", 1)[1]) == ports["grpc"]
    assert int(config.server.metrics_listen.rsplit(":", 1)[1]) == ports["metrics"]
    assert_production(config)


def test_environment_and_secrets_are_what_the_service_reads(
    pod: dict[str, Any], config: Config
) -> None:
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    known = env_read_by_service(config)
    assert set(env) <= known, f"unknown: {sorted(set(env) - known)}"
    assert not {"MEDVAULT_BENCHMARK", "MEDVAULT_FAULT"} & set(env)
    # The PIN and the S3 keys the config names come from the Secret.
    for name in (config.keystore.pin_env, config.s3.access_key_env, config.s3.secret_key_env):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    secrets = _secrets()
    for entry in env.values():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in secrets[ref["name"]], f"{ref} not in secret.example.yaml"
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["secretName"] in secrets
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for name in ("MEDVAULT_CA", "MEDVAULT_CERT", "MEDVAULT_KEY"):
        assert under(env[name]["value"], mounts), name


def test_probes_run_the_health_command(pod: dict[str, Any]) -> None:
    """Kubernetes' grpc probe cannot present a client certificate: the probes run
    ``medvault health`` (as a module), naming only services the health service answers."""
    (container,) = pod["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        args = probe_args(container[probe]["exec"]["command"])
        assert args.func is cmd_health
        assert set(args.service) <= set(DEPENDENCIES), probe
        assert container[probe]["timeoutSeconds"] > args.timeout  # the call's own deadline
    run = subprocess.run(
        [sys.executable, "-m", "service.cli.health_cmd", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "--dependencies" in run.stdout


def test_pod_is_locked_down_and_sized(pod: dict[str, Any]) -> None:
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's medvault user
    assert pod["automountServiceAccountToken"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    hostpaths = [v for v in pod["volumes"] if "hostPath" in v]
    assert [v["name"] for v in hostpaths] == ["pkcs11"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "pkcs11"]
    assert mount["readOnly"] is True


def test_database_connection_verifies_the_server(pod: dict[str, Any], config: Config) -> None:
    """Attack: the database is another namespace's Service, reached over the cluster
    network. ``sslmode=require`` encrypts but checks no certificate, so whoever answers
    for that name (a spoofed Service or DNS entry, a compromised node on the path) gets
    the metadata and audit connection. docs/deployment.md: verify-full off the host,
    against a CA file the pod mounts."""
    query = sa.make_url(config.database.url).query
    assert query.get("sslmode") == "verify-full", f"sslmode={query.get('sslmode')}"
    root = query.get("sslrootcert")
    assert isinstance(root, str), "sslrootcert names no CA file"
    (container,) = pod["containers"]
    assert under(root, {m["mountPath"] for m in container["volumeMounts"]}), root
