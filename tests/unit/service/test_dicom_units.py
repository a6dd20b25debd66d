"""The DICOM service's pure parts: the issuer mapping, the config, the final C-GET
response (the spool: test_dicom_spool)."""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dimse_primitives import C_GET
from pynetdicom.dsutils import encode

from service.config import Config, ConfigError, DicomConfig, TlsConfig, parse
from service.dicom import listener
from service.dicom.listener import DicomListener, _HandshakeFailures
from service.dicom.query import authority, issuer
from service.dicom.retrieve import final_response


@pytest.mark.parametrize(("dicom", "stored"), [
    ("1.2.3", "urn:oid:1.2.3"), ("2.16.840.1.113883.19.5", "urn:oid:2.16.840.1.113883.19.5"),
    ("HOSP", "HOSP"), ("1.2.03", "1.2.03"), ("9.1", "9.1"),
])  # fmt: skip
def test_an_oid_issuer_is_filed_under_its_urn(dicom: str, stored: str) -> None:
    assert authority(dicom) == stored
    assert issuer(stored) == dicom


def _config(tmp_path: Path, dicom: dict[str, object], tls: bool = True) -> None:
    raw = {"database": {"url": "sqlite:///x.db"}, "dicom": dicom,
           "tls": {"enabled": tls, "cert": "c", "key": "k", "client_ca": "ca"}}  # fmt: skip
    parse(raw, tmp_path)


@pytest.mark.parametrize(("dicom", "field"), [
    ({"listen": "nohost"}, "dicom.listen"),
    ({"listen": "127.0.0.1:11112", "ae_title": "A" * 17}, "dicom.ae_title"),
    ({"listen": "127.0.0.1:11112", "ae_title": "BAD\\AE"}, "dicom.ae_title"),
    ({"listen": "127.0.0.1:11112", "max_instance_size": 0}, "dicom.max_instance_size"),
    ({"listen": "127.0.0.1:11112", "spool_directory": ""}, "dicom.spool_directory"),
])  # fmt: skip
def test_bad_dicom_settings_are_named(tmp_path: Path, dicom: dict[str, object], field: str
                                      ) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _config(tmp_path, dicom)


def test_dicom_needs_tls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[dicom\] listen requires \[tls\]"):
        _config(tmp_path, {"listen": "127.0.0.1:11112"}, tls=False)


def test_dicom_is_off_unless_listen_is_set(tmp_path: Path) -> None:
    _config(tmp_path, {}, tls=False)


def test_unloadable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    config = Config(tls=TlsConfig(cert=str(tmp_path / "none.pem"), key=str(tmp_path / "k"),
                                  client_ca=str(tmp_path / "ca.pem")),
                    dicom=DicomConfig(listen="127.0.0.1:0"))  # fmt: skip
    listener = DicomListener(config, None, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"cannot be loaded for \[dicom\]"):
        listener.start()
    listener.stop()


def _get_response(status: int, failed_uids: list[str], counts: tuple[int, int, int],
                  syntax: UID) -> C_GET:  # fmt: skip
    """A final C-GET response as pynetdicom builds it (the list always in a data set)."""
    rsp = C_GET()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.Status = status
    (rsp.NumberOfCompletedSuboperations, rsp.NumberOfFailedSuboperations,
     rsp.NumberOfWarningSuboperations) = counts  # fmt: skip
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = failed_uids
    encoded = encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian)
    assert encoded is not None
    rsp.Identifier = io.BytesIO(encoded)
    return rsp


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_a_c_get_refused_before_any_sub_operation_has_no_data_set_and_no_failures(
    syntax: UID,
) -> None:
    rsp = final_response(_get_response(0x0124, [], (0, 1, 0), syntax), syntax, invoked=0)
    assert rsp.Identifier is None, "an empty Failed SOP Instance UID List was sent"
    assert (rsp.NumberOfCompletedSuboperations, rsp.NumberOfFailedSuboperations,
            rsp.NumberOfWarningSuboperations) == (0, 0, 0)  # fmt: skip


def test_a_c_get_response_naming_failed_instances_is_sent_as_built() -> None:
    syntax = ImplicitVRLittleEndian
    rsp = final_response(_get_response(0xB000, ["1.2.3"], (1, 1, 0), syntax), syntax, invoked=2)
    assert rsp.Identifier is not None, "the failed instance's UID was dropped"
    assert rsp.NumberOfFailedSuboperations == 1


def test_a_failed_sub_operation_listed_without_a_uid_stays_counted() -> None:
    """pynetdicom lists a sub-operation that failed before its C-STORE (a handler's
    yield that is not a data set) as "", which encodes as an empty list: the count is
    kept, since a Pending response went for it (review9 F5)."""
    syntax = ExplicitVRLittleEndian
    rsp = final_response(_get_response(0xA702, [""], (0, 1, 0), syntax), syntax, invoked=1)
    assert rsp.NumberOfFailedSuboperations == 1


def test_a_c_get_failure_after_sub_operations_keeps_its_counts() -> None:
    """Nothing failed (no list), but one instance went: only the data set goes."""
    syntax = ImplicitVRLittleEndian
    rsp = final_response(_get_response(0xA702, [], (1, 2, 0), syntax), syntax, invoked=3)
    assert rsp.Identifier is None
    assert (rsp.NumberOfCompletedSuboperations, rsp.NumberOfFailedSuboperations) == (1, 2)


def test_failed_handshakes_are_rate_limited_and_none_is_lost(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first failure is logged at once; the rest of its window are counted and
    logged together when the window ends (on a hand-moved clock: no real window, so a
    slow host cannot split it)."""
    failures, clock, timers = _handshake_failures(monkeypatch)
    with caplog.at_level(logging.INFO, logger="service.dicom.listener"):
        for kind in ["SSLError"] * 4 + ["TimeoutError"]:
            failures.failed(kind)
            clock.now += 1
        assert _logged(caplog) == [{"SSLError": 1}], "more than a line in a window"
        assert len(timers) == 1, "not one timer for the rest of the window"
        assert timers[0].interval == pytest.approx(9)  # the window's end, from the 2nd
        clock.now += 5  # the window's end
        timers[0].function()
    assert _logged(caplog) == [{"SSLError": 1}, {"SSLError": 3, "TimeoutError": 1}]


class _Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _handshake_failures(
    monkeypatch: pytest.MonkeyPatch, refuse_first_start: bool = False,
    message: str = "dicom tls handshake failed",
) -> tuple[_HandshakeFailures, _Clock, list[threading.Timer]]:
    """A ``_HandshakeFailures`` on a hand-moved clock, its timers recorded and never
    started: the test ends a window by calling the last timer's function itself.
    ``refuse_first_start``: the first timer cannot start (no thread left), as under a
    flood of connections each holding a thread through its handshake."""
    clock, timers = _Clock(), []

    class Timer(threading.Timer):
        def start(self) -> None:
            if refuse_first_start and not timers:
                timers.append(self)
                raise RuntimeError("can't start new thread")
            timers.append(self)  # recorded, not started

    monkeypatch.setattr(listener.time, "monotonic", clock)
    monkeypatch.setattr(listener.threading, "Timer", Timer)
    return _HandshakeFailures(window=10.0, message=message), clock, timers


def _logged(
    caplog: pytest.LogCaptureFixture, message: str = "dicom tls handshake failed"
) -> list[dict[str, int]]:
    return [r.__dict__["failures"] for r in caplog.records
            if r.getMessage() == message]  # fmt: skip


def test_a_window_whose_timer_cannot_start_is_still_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With no thread left for the window's timer, a failure must neither raise out of
    the connection's thread nor leave a timer that never runs in place of the next."""
    failures, clock, timers = _handshake_failures(monkeypatch, refuse_first_start=True)
    with caplog.at_level(logging.INFO, logger="service.dicom.listener"):
        failures.failed("SSLError")  # at once
        clock.now += 1
        failures.failed("SSLError")  # its timer cannot start
        clock.now += 1
        failures.failed("TimeoutError")  # a timer starts now
        assert len(timers) == 2, "no timer for the rest of the window"
        clock.now += 8  # the window's end
        timers[-1].function()
    assert _logged(caplog) == [{"SSLError": 1}, {"SSLError": 1, "TimeoutError": 1}]


def test_a_late_timer_does_not_write_a_second_line_in_a_window(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A window's timer that runs late (a busy host), after a failure already wrote the
    window's line and opened a new window, must not write another line in that window:
    the rest is written when the new window ends."""
    failures, clock, timers = _handshake_failures(monkeypatch)
    with caplog.at_level(logging.INFO, logger="service.dicom.listener"):
        failures.failed("SSLError")  # at once; the window ends at +10
        clock.now += 1
        failures.failed("SSLError")  # counted, a timer for +10
        clock.now += 9.5
        failures.failed("SSLError")  # the timer is late: this one writes the two
        clock.now += 0.5
        failures.failed("TimeoutError")  # in the new window (until +20.5)
        timers[0].function()  # the late timer, at +11
        assert _logged(caplog) == [{"SSLError": 1}, {"SSLError": 2}], "two lines in 0.5 s"
        assert len(timers) == 2, "no timer for the rest of the new window"
        assert timers[1].interval == pytest.approx(9.5)
        clock.now += 9.5
        timers[1].function()
    assert _logged(caplog) == [{"SSLError": 1}, {"SSLError": 2}, {"TimeoutError": 1}]


def test_a_connection_error_is_logged_without_the_peers_address(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Attack (cold review): socketserver's ``handle_error`` printed the peer's address
    and a traceback on stderr (the service's log) for every connection whose thread
    could not start (a flood of connections each holding one through its handshake),
    or whose association raised: anyone reaching the port could fill the log with lines
    naming peers. Now: the error's kind and a count, at most a line per window."""
    errors, _, timers = _handshake_failures(monkeypatch, message="dicom connection error")
    server = SimpleNamespace(connection_errors=errors)

    def start_thread() -> None:
        raise RuntimeError("can't start new thread")

    with caplog.at_level(logging.INFO, logger="service.dicom.listener"):
        for _ in range(3):
            try:
                start_thread()
            except RuntimeError:
                listener._Server.handle_error(server, None, ("203.0.113.9", 40401))  # type: ignore[arg-type]
    out = capsys.readouterr()
    assert "203.0.113.9" not in out.err + out.out + caplog.text, "the peer's address was written"
    assert "Traceback" not in out.err + caplog.text
    assert [r.getMessage() for r in caplog.records] == ["dicom connection error"]
    assert _logged(caplog, "dicom connection error") == [{"RuntimeError": 1}]
    assert len(timers) == 1, "the other two are not counted for the window's end"
