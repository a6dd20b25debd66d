"""The backup and key commands' client side: sizes, progress lines, argument parsing."""

from __future__ import annotations

import pytest

from service._gen.medvault.v1 import backup_pb2 as bpb
from service.cli.backup_cmd import Bars, human_size
from service.cli.main import parser


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB"),
    (2 << 40, "2.0 TiB"),
])  # fmt: skip
def test_human_size(n: int, text: str) -> None:
    assert human_size(n) == text


def test_bars_print_each_finished_phase_once_elsewhere_than_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bars = Bars()
    for done, size in ((1, 100), (3, 3000), (3, 3000)):  # the final report may repeat
        bars(bpb.Progress(phase="objects", done=done, total=3, bytes_done=size))
    bars(bpb.Progress(phase="manifest", done=1, total=1, bytes_done=3000))
    bars.close()
    assert capsys.readouterr().err.splitlines() == [
        "objects: 3/3 (2.9 KiB)", "manifest: 1/1 (2.9 KiB)",
    ]


def test_import_cert_keeps_the_callers_certificate_apart_from_the_imported_one() -> None:
    ns = parser().parse_args(
        ["keys", "import-cert", "dr-x", "signer.pem", "--cert", "me.pem", "--key", "me.key"]
    )
    assert (ns.certificate, ns.cert, ns.key) == ("signer.pem", "me.pem", "me.key")


@pytest.mark.parametrize("command", [
    ["backup", "run"], ["backup", "list"], ["backup", "verify", "20260101T000000Z-00000000"],
    ["backup", "prune"], ["backup", "public-key"], ["restore-drill", "20260101T000000Z-00000000"],
    ["keys", "list"], ["keys", "create-signer", "x"],
])  # fmt: skip
def test_service_commands_take_connection_flags_and_no_config(command: list[str]) -> None:
    ns = parser().parse_args([*command, "--endpoint", "h:1", "--cert", "c", "--key", "k"])
    assert (ns.endpoint, ns.cert, ns.key) == ("h:1", "c", "k")
    assert getattr(ns, "config", None) is None
