"""What ``medvault --help`` and ``--version`` tell a new user."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from service.cli.main import main, parser
from service.localstack.stack import DEFAULT_CLIENTS


def _options(p: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, str, str]]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}".strip())
        elif not isinstance(action, argparse._HelpAction):  # flags and positionals
            name = max(action.option_strings, key=len) if action.option_strings else action.dest
            yield path, name, action.help or ""


def _help_of(path: str, flag: str) -> str:
    return next(h for p, f, h in _options(parser()) if (p, f) == (path, flag))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("medvault 0.")


def test_every_flag_has_help() -> None:
    missing = [f"{path} {flag}" for path, flag, text in _options(parser())
               if not text]  # fmt: skip
    assert missing == []


@pytest.mark.parametrize(("path", "flag", "words"), [
    ("put", "--kind", ["kind"]),
    ("put", "--title", ["title"]),
    ("put", "--content-type", ["MIME", "default"]),
    ("access grant", "--for", ["hours"]),
    ("audit query", "--since", ["24h", "7d"]),
    ("get", "--output", ["directory must exist"]),
    ("get", "--endpoint", ["MEDVAULT_ENDPOINT", "MEDVAULT_HOME"]),
    ("stack status", "--home", ["MEDVAULT_HOME"]),
])  # fmt: skip
def test_flag_help_says_what_to_give(path: str, flag: str, words: list[str]) -> None:
    text = _help_of(path, flag)
    for word in words:
        assert word in text, f"{path} {flag}: {word!r} not in {text!r}"


def test_stack_env_as_lists_every_role_it_accepts() -> None:
    text = _help_of("stack env", "--as")
    for role in DEFAULT_CLIENTS.values():
        assert role in text, role


def test_the_cli_loads_no_server_side_machinery() -> None:
    """Every `medvault` command is a gRPC client: importing the CLI must not load the
    backup use cases, the PDF signer or the content parsers (they cost a second of CPU
    per invocation, which every command and every CLI test paid)."""
    probe = (
        "import sys, service.cli.main\n"
        "heavy = ('service.backup', 'service.signing', 'pyhanko', 'pydicom', 'storage.formats')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == "", f"loaded by the CLI: {out}"
