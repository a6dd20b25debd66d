"""deploy/docker/Dockerfile: non-root, no PKCS#11 module inside, a real entry point.

The image is not built here (no registry to pull the base from); docs/deployment.md
says so. What can be checked without building it is checked.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.unit.deploy.manifests import DEPLOY, ROOT, cli_args

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                logical.append((word.upper(), rest.strip()))
            current = ""
    return logical


def test_runs_as_the_unprivileged_user_on_a_slim_base() -> None:
    steps = _instructions()
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG")
    assert args["PYTHON_IMAGE"].startswith("python:")
    assert "-slim" in args["PYTHON_IMAGE"]
    users = [rest for word, rest in steps if word == "USER"]
    assert users == ["10001:10001"]  # the last stage's user; k8s runAsUser matches it
    assert [w for w, _ in steps].index("USER") > max(
        i for i, (w, _) in enumerate(steps) if w in {"RUN", "COPY"}
    )


def test_no_pkcs11_module_is_copied_in() -> None:
    for word, rest in _instructions():
        if word in {"COPY", "ADD"}:
            assert ".so" not in rest, rest
            assert "softhsm" not in rest.lower(), rest
        if word == "RUN":
            assert "softhsm" not in rest.lower(), "the token's module is mounted, not installed"


def test_copies_exactly_the_packages_pyproject_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = [rest.split()[0] for word, rest in _instructions()
              if word == "COPY" and not rest.startswith("--")]  # fmt: skip
    assert {c for c in copied if (ROOT / c).is_dir()} == {p.rstrip("*") for p in include}
    for source in copied:
        assert (ROOT / source).exists(), source
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    for source in copied:
        assert f"!{source}" in ignore, f"{source} is excluded from the build context"


def test_entry_point_is_the_console_script_and_serve_starts() -> None:
    steps = dict(_instructions())
    entry, command = json.loads(steps["ENTRYPOINT"]), json.loads(steps["CMD"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert entry == ["medvault"]
    assert "medvault" in project["project"]["scripts"]
    args = cli_args(command)
    assert args.command == "serve"
    assert args.config == "/etc/medvault/config.toml"
    # The very command the build stage runs to prove the install.
    run = subprocess.run(
        [str(Path(sys.executable).with_name("medvault")), *shlex.split("serve --help")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "--config" in run.stdout
