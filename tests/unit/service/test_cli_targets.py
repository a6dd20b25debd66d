"""The CLI's target: one address, or several replicas balanced round robin with retries."""

from __future__ import annotations

import json

import pytest

from service.cli.targets import IDEMPOTENT, EndpointError, parse
from service.localstack.cluster import config_value, with_listener_ports


def test_one_address_stays_a_plain_target() -> None:
    target = parse("medvault.example:7443")
    assert (target.target, target.authority) == ("medvault.example:7443", "medvault.example:7443")


def test_several_addresses_become_a_static_list_checked_under_the_first_name() -> None:
    target = parse("127.0.0.1:7443, localhost:7444")
    assert target.target == "ipv4:127.0.0.1:7443,127.0.0.1:7444"
    options = dict(target.options())
    assert options["grpc.default_authority"] == "127.0.0.1:7443"
    config = json.loads(str(options["grpc.service_config"]))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    policy = config["methodConfig"][0]
    assert policy["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    names = {(n["service"], n["method"]) for n in policy["name"]}
    assert ("medvault.v1.RecordService", "PutRecord") in names  # the CLI always sends a request id
    assert ("medvault.v1.RecordService", "GetRecord") in names
    assert not {m for _, m in names} & {"RotateKek", "RunBackup", "GrantAccess", "SignRecord"}
    assert ("grpc.health.v1.Health", "Check") not in names  # a probe asks this address


def test_ipv6_lists() -> None:
    assert parse("[::1]:1,[::1]:2").target == "ipv6:[::1]:1,[::1]:2"


@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        ("127.0.0.1:1,", "empty address"),
        ("127.0.0.1:1,127.0.0.1", "must be HOST:PORT"),
        ("127.0.0.1:1,127.0.0.1:99999", "must be HOST:PORT"),
        ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
        ("127.0.0.1:1,no-such-host.invalid:2", "does not resolve"),
    ],
)
def test_bad_lists_are_refused_naming_the_part(endpoint: str, says: str) -> None:
    with pytest.raises(EndpointError, match=says):
        parse(endpoint)


def test_only_idempotent_methods_are_retried() -> None:
    writes = {"PutRecord"}  # idempotent through its request id
    for methods in IDEMPOTENT.values():
        for method in set(methods) - writes:
            assert method.startswith(("Get", "List", "Stat", "Query", "Verify", "Export",
                                      "Count", "WhoAmI")), method  # fmt: skip


def test_replica_config_changes_only_the_listener_ports() -> None:
    text = (
        '[server]\nlisten = "0.0.0.0:7443"  # all interfaces\nmetrics_listen = ""\n'
        'policy = "policy.toml"\n\n[s3]\nendpoint = "127.0.0.1:8333"\n\n'
        '[mllp]\nlisten = "127.0.0.1:2575"\n'
    )
    derived = with_listener_ports(text, {"grpc": 7444, "mllp": 2576})
    assert config_value(derived, "server", "listen") == "0.0.0.0:7444"
    assert config_value(derived, "mllp", "listen") == "127.0.0.1:2576"
    assert config_value(derived, "s3", "endpoint") == "127.0.0.1:8333"
    assert config_value(derived, "server", "metrics_listen") == ""
    assert "# all interfaces" in derived
