"""The benchmark-only switch that turns auditing off is refused outside a benchmark."""

from pathlib import Path

import pytest

from service.bootstrap import BENCHMARK_ENV, _check_audit_switch
from service.config import ConfigError, parse

BASE = {"database": {"url": "sqlite:///x"}, "tls": {"enabled": False}}


def test_audit_off_is_refused_without_the_benchmark_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(BENCHMARK_ENV, raising=False)
    config = parse({**BASE, "audit": {"enabled": False}}, Path())
    with pytest.raises(ConfigError, match="benchmark-only"):
        _check_audit_switch(config)


def test_audit_off_is_accepted_in_a_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BENCHMARK_ENV, "1")
    _check_audit_switch(parse({**BASE, "audit": {"enabled": False}}, Path()))


def test_audit_on_needs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BENCHMARK_ENV, raising=False)
    _check_audit_switch(parse(BASE, Path()))
