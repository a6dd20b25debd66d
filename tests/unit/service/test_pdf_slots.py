"""Attack (cold review): whole PDFs held in memory at once are bounded over all callers.

PAdES signing and verifying a PDF that may embed signatures hold the whole file (up to
64 MiB) and pyHanko's copy and parse of it. Before the bound, every principal could run
its whole share of calls (a quarter of the workers each) on 64 MiB PDFs at once, and a
few principals could hold gigabytes. Here a verify is held mid-read (its content stream
waits on an event) and the next one is refused with RESOURCE_EXHAUSTED's error at once;
the slot is free again once the first ends. An in-memory store stands in for the
record store (tests/integration/signing covers the real path).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from service.limits import PdfBusyError
from service.signing import DocumentSigning, SignatureFormat
from service.signing.validation import SignatureValidator
from service.status import status_for
from storage.model import PatientRef, RecordInfo, RecordKind
from storage.signatures import Signature
from tests.content import pdf

NOW = datetime(2026, 11, 29, tzinfo=UTC)


@dataclass
class _Held:
    """A PDF version whose content stream stops after its first piece until released."""

    data: bytes
    started: threading.Event
    release: threading.Event

    def pieces(self) -> Iterator[bytes]:
        self.started.set()
        yield self.data[:10]
        assert self.release.wait(30), "the test never released the stream"
        yield self.data[10:]


class _Opened:
    def __init__(self, data: bytes, content: Iterator[bytes]) -> None:
        self.info = RecordInfo(
            id="0" * 32, version=1, patient=PatientRef("synthetic", "2.999"),
            kind=RecordKind.PDF, content_type="application/pdf", title="", size=len(data),
            stored_size=len(data), sha256=b"", created_at=NOW, created_by="clerk",
            supersedes_version=None,
        )  # fmt: skip
        self.content = content

    def signatures(self) -> list[Signature]:
        return [Signature("1" * 32, "0" * 32, 1, "dr", "CN=dr", "ecdsa", NOW, NOW, b"0")]


class _Store:
    """Opens the same PDF for every call; the first open's content is held."""

    def __init__(self, held: _Held) -> None:
        self._held = held
        self._first = True

    def open(self, record_id: str, version: int | None, *, admit: Any) -> _Opened:
        first, self._first = self._first, False
        content = self._held.pieces() if first else iter([self._held.data])
        return _Opened(self._held.data, content)


def test_a_pdf_verify_over_the_slots_is_refused_at_once_and_the_slot_comes_back() -> None:
    held = _Held(pdf("synthetic"), threading.Event(), threading.Event())
    signing = DocumentSigning(
        _Store(held), signers=None, validator=SignatureValidator([]), pdf_slots=1  # type: ignore[arg-type]
    )
    results: list[Any] = []
    first = threading.Thread(
        target=lambda: results.append(signing.verify("0" * 32, None, admit=None))  # type: ignore[arg-type]
    )
    first.start()
    try:
        assert held.started.wait(30), "the first verify never started reading"
        with pytest.raises(PdfBusyError) as refused:
            signing.verify("0" * 32, None, admit=None)  # type: ignore[arg-type]
        assert status_for(refused.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        held.release.set()
        first.join(30)
    assert not first.is_alive()
    assert [fmt for _, _, fmt in results[0]] == [SignatureFormat.CADES_DETACHED]
    again = signing.verify("0" * 32, None, admit=None)  # type: ignore[arg-type]
    assert len(again) == 1, "the slot is free once the first verify ended"
