"""deploy/systemd: the units verify, are hardened, and feed the config what it names."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import load
from tests.unit.deploy.manifests import DEPLOY, assert_production, cli_args, config_paths, under

UNITS = DEPLOY / "systemd"
MEDVAULT = Path(sys.executable).with_name("medvault")


def _directives(unit: Path) -> dict[str, list[str]]:
    """``Key`` -> every value it is given (systemd keys repeat: LoadCredential=)."""
    found: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{unit.name}: not a Key=value line: {line}"
        found.setdefault(key, []).append(value)
    return found


def _instance(unit: Path, value: str, name: str = "a") -> str:
    return value.replace("%i", name) if "@" in unit.name else value


@pytest.mark.parametrize("name", ["medvault.service", "medvault@.service"])
def test_unit_is_hardened_and_runs_the_real_serve_command(name: str) -> None:
    unit = UNITS / name
    d = _directives(unit)
    for key, value in {
        "User": "medvault", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "PrivateTmp": "yes", "ProtectHome": "yes", "CapabilityBoundingSet": "",
        "AmbientCapabilities": "", "UMask": "0077", "KillSignal": "SIGTERM",
    }.items():  # fmt: skip
        assert d.get(key) == [value], f"{name}: {key}={value} expected, got {d.get(key)}"
    argv = shlex.split(d["ExecStart"][0])
    assert argv[0] == "/opt/medvault/bin/medvault"
    args = cli_args(argv[1:])
    assert args.command == "serve"
    assert args.config.startswith("/etc/medvault/")
    # The state folder is writable (ProtectSystem=strict makes the rest read-only).
    state = "/var/lib/" + d["StateDirectory"][0]
    assert state in d["ReadWritePaths"]
    assert "-HUP" in d["ExecReload"][0]  # policy and CRL reload
    if "@" in name:
        assert "%i" in args.config, "each instance its own config"
        assert "%i" in state, "each instance its own state folder"


@pytest.mark.parametrize("name", ["medvault.service", "medvault@.service"])
def test_every_credential_the_config_names_is_loaded(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """config.example.toml loads with the real loader, and each $CREDENTIALS_DIRECTORY
    file it names is a LoadCredential= of the unit (and PGPASSFILE one too)."""
    d = _directives(UNITS / name)
    loaded = {entry.split(":", 1)[0] for entry in d["LoadCredential"]}
    folder = f"/run/credentials/{name.replace('@', '@a')}"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", folder)
    config = load(UNITS / "config.example.toml")
    named = {Path(p).name for p in config_paths(config).values() if p.startswith(folder + "/")}
    assert named, "the example names no credential"
    assert named <= loaded, f"named but not loaded: {sorted(named - loaded)}"
    env = dict(e.split("=", 1) for e in d["Environment"])
    assert env["PGPASSFILE"] == "%d/pgpass"
    assert "pgpass" in loaded
    assert_production(config)
    # What the service writes lies in the unit's writable paths.
    writable = {_instance(UNITS / name, p) for p in d["ReadWritePaths"]}
    if config.audit.witness_file and "@" not in name:
        assert under(config.audit.witness_file, writable)
    assert not config.backup.schedule_seconds
    assert not config.backup.drill_schedule_seconds


def test_no_timer_units_the_service_schedules_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backups, drills, sweeps and checkpoints run inside the service (one elected
    replica per slot): a timer unit would run them a second time."""
    assert sorted(p.name for p in UNITS.glob("*.timer")) == []
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/medvault.service")
    config = load(UNITS / "config.example.toml")
    assert config.backup.schedule
    assert config.backup.drill_schedule


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """``systemd-analyze verify`` (and the offline security score) when systemd is
    installed; the checks above run either way."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd)")
    for name in ("medvault.service", "medvault@.service"):
        # verify checks that ExecStart exists: point it at this checkout's medvault.
        text = (UNITS / name).read_text().replace("/opt/medvault/bin/medvault", str(MEDVAULT))
        (tmp_path / name).write_text(text)
    (tmp_path / "medvault@a.service").write_text((tmp_path / "medvault@.service").read_text())
    for name in ("medvault.service", "medvault@a.service"):
        run = subprocess.run(
            [analyze, "verify", str(tmp_path / name)], capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        assert (run.returncode, run.stderr.strip()) == (0, ""), f"{name}: {run.stderr}"
        score = subprocess.run(
            [analyze, "security", "--offline=yes", "--threshold=20", str(tmp_path / name)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", score.stdout)
        assert score.returncode == 0, f"{name}: exposure above 2.0\n{score.stdout[-300:]}"
        assert level, score.stdout[-300:]
