"""A command line imports only the module of the command it names; ``medvault --help``
imports none of them. The table of commands in ``service.cli.main`` must equal what the
modules register, or a command would vanish from (or linger in) the help."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from service.cli.main import COMMANDS, parser


def _subcommands(top: argparse.ArgumentParser) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    return next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))


def test_the_table_of_commands_is_what_the_modules_register() -> None:
    sub = _subcommands(parser())
    registered = {action.dest: action.help for action in sub._choices_actions}
    table = {name: text for name, (_, text) in COMMANDS.items()}
    # serve and sweep are main's own, not in the table.
    assert {k: v for k, v in registered.items() if k not in ("serve", "sweep")} == table


def test_help_lists_every_command_with_its_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    for name, (_, text) in COMMANDS.items():
        assert name in out
        assert text[:40] in " ".join(out.split()), name


def _loaded_by(argv: list[str]) -> set[str]:
    probe = (
        "import sys\n"
        "from service.cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(','.join(sorted(sys.modules)))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return set(run.stdout.strip().splitlines()[-1].split(","))


def test_help_imports_no_command_module_grpc_or_the_stack() -> None:
    loaded = _loaded_by(["--help"])
    heavy = {"grpc", "sqlalchemy", "minio", "pkcs11", "google.protobuf", "importlib.metadata"}
    assert not heavy & loaded
    assert not {m for m in loaded if m.startswith("service.cli.") and m.endswith("_cmd")}
    assert not {m for m in loaded if m.startswith("service.localstack.") and m != (
        "service.localstack.names")}  # fmt: skip


def test_a_command_imports_only_its_own_module() -> None:
    loaded = _loaded_by(["ls", "--help"])
    commands = {m for m in loaded if m.startswith("service.cli.") and m.endswith("_cmd")}
    assert commands == {"service.cli.records_cmd"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_gets_its_full_parser(name: str) -> None:
    sub = _subcommands(parser([name, "--help"]))
    assert sub.choices[name].add_help, f"{name} got a placeholder, not its parser"


def test_version_and_an_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        parser(["--version"]).parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("medvault ")
    with pytest.raises(SystemExit) as done:
        parser(["bogus"]).parse_args(["bogus"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err
    assert "put" in err
