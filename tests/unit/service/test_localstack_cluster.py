"""A stack home keeps its topology; cluster-only flags need the cluster topology."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from service.cli.main import parser
from service.localstack.cluster import (
    CLUSTER_FILE,
    ClusterStack,
    default_database_url,
    open_stack,
    with_process_share,
)
from service.localstack.stack import LocalStack, LocalStackError


def test_a_new_home_gets_the_topology_asked_for(tmp_path: Path) -> None:
    assert type(open_stack(tmp_path / "a")) is LocalStack
    assert type(open_stack(tmp_path / "b", "cluster", replicas=3)) is ClusterStack


def test_a_home_keeps_its_topology(tmp_path: Path) -> None:
    single, cluster = tmp_path / "single", tmp_path / "cluster"
    single.mkdir()
    (single / "config.toml").write_text("")
    cluster.mkdir()
    (cluster / CLUSTER_FILE).write_text('{"replicas": 2, "ports": {}}')
    with pytest.raises(LocalStackError, match="single-topology stack; use another --home"):
        open_stack(single, "cluster")
    with pytest.raises(LocalStackError, match="cluster-topology stack"):
        open_stack(cluster, "single")
    assert type(open_stack(cluster)) is ClusterStack  # status, env, down: no flags


def test_cluster_flags_need_the_cluster_topology(tmp_path: Path) -> None:
    with pytest.raises(LocalStackError, match="need --topology cluster"):
        open_stack(tmp_path, replicas=2)
    with pytest.raises(LocalStackError, match="at least 1"):
        open_stack(tmp_path, "cluster", replicas=0)


def test_the_default_database_is_the_homes_own(tmp_path: Path) -> None:
    one, other = default_database_url(tmp_path / "a"), default_database_url(tmp_path / "b")
    assert one != other
    assert one.startswith("postgresql+psycopg://postgres@127.0.0.1:5432/medvault_stack_")


def test_stack_up_refuses_cluster_flags_on_a_single_home_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = parser().parse_args(["stack", "up", "--home", str(tmp_path), "--replicas", "2"])
    assert ns.func(ns) == 1
    assert "--replicas and --database-url need --topology cluster" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing is created"


def test_replicas_share_the_cores_unless_config_sets_a_count() -> None:
    text = '[server]\nlisten = "127.0.0.1:7443"\n\n[s3]\nendpoint = "x"\n'
    shared = tomllib.loads(with_process_share(text, 3))
    assert shared["server"] == {"listen": "127.0.0.1:7443", "processes": 3}
    assert shared["s3"] == {"endpoint": "x"}
    per_core = text.replace("[s3]", "processes = 0\n[s3]")
    assert tomllib.loads(with_process_share(per_core, 2))["server"]["processes"] == 2
    fixed = text.replace("[s3]", "processes = 4  # set by hand\n[s3]")
    assert with_process_share(fixed, 2) == fixed
    assert tomllib.loads(with_process_share('[s3]\nendpoint = "x"\n', 1))["server"] == {
        "processes": 1
    }
