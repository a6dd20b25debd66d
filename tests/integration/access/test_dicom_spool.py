"""The DICOM spool against a running service (SQLite and PostgreSQL), read as a local
attacker would: while a C-STORE arrives, after it, after it is cut off, and after the
service is killed in its middle, no file of the spool folder, the state folder or the
system's temporary folder holds the (synthetic) patient's ID, name or pixel bytes.

A C-STORE is held midway by a tunnel (``HeldTunnel``) between pynetdicom, sending a data
set built in memory (so its bytes exist on no disk unless the service writes them), and
the service. The spool's files have no name: they are read through ``/proc/<pid>/fd``.

PYTEST_DONT_REWRITE: failures name places and counts, never the bytes looked for.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from storage.sql_metadata import record_index
from tests import content
from tests.fixtures.service import RunningService, free_port
from tests.integration.access.dicom_tools import (
    AE_TITLE,
    HeldTunnel,
    Peer,
    dataset_part,
    tls_tunnel,
)
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    engine_for,
    events,
    grant,
    new_patient,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODALITY = "ct-scanner-spool"
DOCTOR = "radiologist-spool"
MiB = 1 << 20
CAP = 8 * MiB
TMP = Path(tempfile.gettempdir())


@dataclass
class World:
    service: RunningService
    port: int
    engine: sa.Engine
    clerk: Client
    doctor: Client
    modality: Peer
    officer: Client


def _dicom_sections(port: int, **more: Any) -> dict[str, dict[str, Any]]:
    return {"dicom": {"listen": f"127.0.0.1:{port}", "ae_title": AE_TITLE,
                      "max_instance_size": CAP, **more}}  # fmt: skip


@pytest.fixture(scope="module")
def w(service_factory: Any, fresh_database: str, issue: Any, tls_files: Any) -> Iterator[World]:
    port = free_port()
    service: RunningService = service_factory(fresh_database,
                                              extra_sections=_dicom_sections(port))  # fmt: skip
    cert, key = issue(MODALITY, "records_clerk")
    world = World(service, port, engine_for(fresh_database),
                  client(service, issue("clerk-spool", "records_clerk")),
                  client(service, issue(DOCTOR, "radiologist")),
                  Peer(cert, key, tls_files.ca),
                  client(service, issue("officer-spool", "security_officer")))  # fmt: skip
    yield world
    for c in (world.clerk, world.doctor, world.officer):
        c.close()
    world.engine.dispose()
    service.stop()


def _spool_of(service: RunningService) -> Path:
    return service.config_path.parent / "dicom-spool"  # the default: in the state folder


@dataclass
class Instance:
    """A synthetic instance built in memory, and the bytes no disk may hold in clear."""

    dataset: Dataset
    secrets: list[bytes]

    @property
    def sop(self) -> str:
        return str(self.dataset.SOPInstanceUID)


def _instance(w: World, size: int) -> Instance:
    patient = new_patient()
    grant(w.clerk, patient, DOCTOR)
    name = f"SPOOL^{uuid.uuid4().hex[:12].upper()}"
    pixels = os.urandom(size)
    ds = dcmread(io.BytesIO(content.dicom(patient.id, patient.assigning_authority,
                                          PatientName=name, pixels=pixels)))  # fmt: skip
    return Instance(ds, [patient.id.encode(), name.encode(), pixels[:48], pixels[MiB : MiB + 48]])


def _spool_files(pid: int, spool: Path) -> list[Path]:
    """The spool files ``pid`` holds open: in the spool folder (named or not), or a
    ``*.dcm`` of the system's temporary folder (where pynetdicom spooled before)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}").removesuffix(" (deleted)")
            if target.startswith(f"{spool}/") or (
                Path(target).parent == TMP and target.endswith(".dcm")
            ):
                found.append(Path(f"/proc/{pid}/fd/{fd}"))
    return found


def _sizes(pid: int, spool: Path) -> list[int]:
    sizes = []
    for path in _spool_files(pid, spool):
        with contextlib.suppress(OSError):
            sizes.append(path.stat().st_size)
    return sizes


def _holds(path: Path, secrets: list[bytes]) -> bool:
    """True if the file at ``path`` holds any of ``secrets`` (read in blocks)."""
    keep = max(map(len, secrets)) - 1
    tail = b""
    try:
        with path.open("rb") as f:
            while block := f.read(4 * MiB):
                window = tail + block
                if any(s in window for s in secrets):
                    return True
                tail = window[-keep:]
    except OSError:  # gone meanwhile, or not a file one can read
        return False
    return False


def _clear_copies(secrets: list[bytes], roots: list[Path], since: float,
                  pid: int | None = None, spool: Path | None = None) -> list[str]:  # fmt: skip
    """Where ``secrets`` are found: every regular file under ``roots`` changed since
    ``since``, and the spool files ``pid`` holds open. Places only, never content."""
    places = []
    if pid is not None and spool is not None:
        places += [f"open spool file {p.name}" for p in _spool_files(pid, spool)
                   if _holds(p, secrets)]  # fmt: skip
    seen: set[Path] = set()
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = Path(folder, name)
                with contextlib.suppress(OSError):
                    info = path.lstat()
                    if (stat.S_ISREG(info.st_mode) and info.st_mtime >= since
                            and path not in seen):  # fmt: skip
                        seen.add(path)
                        if _holds(path, secrets):
                            places.append(str(path))
    return places


def _service_saw(service: RunningService, since: int) -> str:
    """The service log's warnings and errors after its first ``since`` lines: logger and
    message only (the log holds no patient data; its other fields are left out)."""
    lines = service.log_path.read_text(errors="replace").splitlines()[since:]
    seen = []
    for line in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("level") in ("warning", "error", "critical"):
                seen.append(f"{entry.get('logger')}: {entry.get('msg')}")
    return f"service logged {seen or 'no warning or error'}"


class _Sender:
    """pynetdicom sending one instance through a ``HeldTunnel``, in a thread of its own.
    ``service_saw`` says, if the association is refused, what the service logged."""

    def __init__(self, tunnel: HeldTunnel, dataset: Dataset,
                 service_saw: Callable[[], str]) -> None:  # fmt: skip
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(content.CT_IMAGE, ExplicitVRLittleEndian)
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 120
        began = time.monotonic()
        self.assoc = ae.associate("127.0.0.1", tunnel.port, ae_title=AE_TITLE)
        # The time taken is told, not asserted: a refusal after the service's network
        # timeout (60 s) is the service closing a connection that never associated.
        assert self.assoc.is_established, (
            f"association refused after {time.monotonic() - began:.0f} s: {tunnel.seen()}; "
            f"{service_saw()}"
        )
        self.status: int | None = None
        self._thread = threading.Thread(target=self._send, args=(dataset,), daemon=True)
        self._thread.start()

    def _send(self, dataset: Dataset) -> None:
        with contextlib.suppress(Exception):  # cut off: no status
            reply = self.assoc.send_c_store(dataset)
            self.status = int(reply.Status) if "Status" in reply else None

    def result(self) -> int | None:
        self._thread.join(120)
        if self.assoc.is_established:
            self.assoc.release()
        return self.status

    def cut(self) -> None:
        """Abort (the sending thread, a daemon, ends when pynetdicom gives up)."""
        if self.assoc.is_established:
            self.assoc.abort()


@contextlib.contextmanager
def _held(w: World, instance: Instance,
          allowance: int | None) -> Iterator[tuple[HeldTunnel, _Sender]]:  # fmt: skip
    logged = len(w.service.log_path.read_text(errors="replace").splitlines())
    tunnel = HeldTunnel(w.modality, w.port, allowance)
    sender = _Sender(tunnel, instance.dataset, lambda: _service_saw(w.service, logged))
    try:
        yield tunnel, sender
    finally:
        tunnel.close()
        with contextlib.suppress(Exception):
            sender.cut()


def _wait_spooled(service: RunningService, at_least: int) -> None:
    pid, spool = service.process.pid, _spool_of(service)
    wait_for(lambda: any(s >= at_least for s in _sizes(pid, spool)), 60,
             f"a spool file of {at_least} bytes")  # fmt: skip


def _index_count(w: World, value: str) -> int:
    with w.engine.connect() as c:
        return int(c.scalar(sa.select(sa.func.count()).select_from(record_index)
                            .where(record_index.c.value == value)) or 0)  # fmt: skip


def _stored(w: World, instance: Instance) -> list[bytes]:
    """The contents GetStudy streams for the instance's study (gRPC)."""
    request = pb.GetStudyRequest(study_uid=str(instance.dataset.StudyInstanceUID))
    contents: list[bytearray] = []
    for response in w.doctor.records.GetStudy(request, timeout=TIMEOUT):
        if response.WhichOneof("message") == "instance":
            contents.append(bytearray())
        else:
            contents[-1] += response.chunk
    return [bytes(b) for b in contents]


def _roots(service: RunningService) -> list[Path]:
    return [TMP, service.config_path.parent]


def test_a_c_store_in_flight_is_spooled_sealed_then_stored_byte_identical(w: World) -> None:
    since = time.time() - 1
    instance = _instance(w, 6 * MiB)
    pid, spool = w.service.process.pid, _spool_of(w.service)
    with _held(w, instance, 3 * MiB) as (tunnel, sender):
        tunnel.wait_forwarded(3 * MiB)
        _wait_spooled(w.service, 3 * MiB // 2)
        # Midway: the spool holds half the instance, none of it in clear, and no name.
        assert not _clear_copies(instance.secrets, _roots(w.service), since, pid, spool), (
            "patient bytes on the disk while the C-STORE arrives"
        )
        assert list(spool.iterdir()) == [], "a spool file has a name"
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700
        tunnel.allow(None)
        status = sender.result()
        assert status == 0x0000, f"the C-STORE failed: {status}"
    wait_for(lambda: not _spool_files(pid, spool), 30, "the spool file's close")
    # Stored as sent, byte for byte (behind the file meta medvault writes).
    [stored] = _stored(w, instance)
    assert dataset_part(stored) == encode(instance.dataset, False, True), "stored data set differs"
    assert not _clear_copies(instance.secrets, _roots(w.service), since), (
        "patient bytes on the disk after the C-STORE"
    )


def test_a_c_store_cut_off_midway_leaves_nothing_behind(w: World) -> None:
    since = time.time() - 1
    instance = _instance(w, 6 * MiB)
    pid, spool = w.service.process.pid, _spool_of(w.service)
    with _held(w, instance, 3 * MiB) as (tunnel, sender):
        tunnel.wait_forwarded(3 * MiB)
        _wait_spooled(w.service, 3 * MiB // 2)
        tunnel.close()  # the connection drops midway: no handler runs for this data set
        sender.cut()
    wait_for(lambda: not _spool_files(pid, spool), 20, "the cut-off spool's close")
    assert not _clear_copies(instance.secrets, _roots(w.service), since, pid, spool), (
        "patient bytes on the disk after a C-STORE was cut off"
    )
    assert _index_count(w, instance.sop) == 0, "a cut-off instance was stored"


def test_an_instance_over_the_cap_is_spooled_sealed_dropped_and_refused(w: World) -> None:
    since = time.time() - 1
    instance = _instance(w, CAP + 4 * MiB)
    pid, spool = w.service.process.pid, _spool_of(w.service)
    with _held(w, instance, 4 * MiB) as (tunnel, sender):
        tunnel.wait_forwarded(4 * MiB)
        _wait_spooled(w.service, 2 * MiB)
        assert not _clear_copies(instance.secrets, _roots(w.service), since, pid, spool), (
            "patient bytes on the disk while an oversized C-STORE arrives"
        )
        # Past the cap: what was kept is dropped at once, the rest read and discarded.
        tunnel.allow(CAP + 2 * MiB)
        tunnel.wait_forwarded(CAP + 2 * MiB)
        wait_for(lambda: _sizes(pid, spool) == [0], 30, "the oversized spool emptied")
        tunnel.allow(None)
        status = sender.result()
    assert status == 0xA700, f"an instance over the cap: {status}"
    assert _index_count(w, instance.sop) == 0, "stored over the cap"
    wait_for(lambda: not _spool_files(pid, spool), 30, "the spool file's close")


def test_a_service_killed_mid_c_store_leaves_nothing_in_clear_and_restarts_empty(
    w: World, service_factory: Any, fresh_database: str
) -> None:
    since = time.time() - 1
    port = free_port()
    victim: RunningService = service_factory(fresh_database,
                                             extra_sections=_dicom_sections(port))  # fmt: skip
    spool = _spool_of(victim)
    instance = _instance(w, 6 * MiB)
    with _held(World(**{**w.__dict__, "service": victim, "port": port}), instance,
               3 * MiB) as (tunnel, _):  # fmt: skip
        tunnel.wait_forwarded(3 * MiB)
        _wait_spooled(victim, 3 * MiB // 2)
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(30)
    assert not _clear_copies(instance.secrets, _roots(victim), since), (
        "patient bytes on the disk after the service was killed mid-C-STORE"
    )
    assert _index_count(w, instance.sop) == 0, "an instance stored by a killed service"

    # What a kill between a spool file's creation and its unlink leaves (empty files),
    # and a folder whose mode was loosened: the next start empties and closes it.
    leftovers = [uuid.uuid4().hex + ".spool" for _ in range(2)]
    for name in leftovers:
        (spool / name).write_bytes(b"")
    spool.chmod(0o755)
    again: RunningService = service_factory(fresh_database, extra_sections=_dicom_sections(
        free_port(), spool_directory=str(spool)))  # fmt: skip
    try:
        assert list(spool.iterdir()) == [], "leftovers of the killed service kept"
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700
        log = again.log_path.read_text()
        emptied = [json.loads(line) for line in log.splitlines()
                   if '"dicom spool emptied"' in line]  # fmt: skip
        assert [e.get("removed") for e in emptied] == [2], "the count of leftovers removed"
        assert not any(name in log for name in leftovers), "a leftover's name was logged"
    finally:
        again.stop()


def _failed_writes(w: World, status: str) -> int:
    return len([e for e in events(w.officer, principal=MODALITY, action="records.write",
                                  outcome=aupb.OUTCOME_FAILED) if e.status == status])  # fmt: skip


def _send_without_waiting(port: int, instances: list[Instance]) -> list[int]:
    """pynetdicom sending ``instances`` in one association without waiting for each
    answer (a peer ignoring the one operation at a time negotiated); their statuses."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(content.CT_IMAGE, ExplicitVRLittleEndian)
    ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established, "association refused"
    # The answers are read here: pynetdicom's reactor is paused, as its send_c_store does.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        context = assoc.accepted_contexts[0].context_id
        for number, instance in enumerate(instances, 1):
            request = C_STORE()
            request.MessageID = number
            request.AffectedSOPClassUID = content.CT_IMAGE
            request.AffectedSOPInstanceUID = instance.sop
            request.DataSet = io.BytesIO(encode(instance.dataset, False, True))
            assoc.dimse.send_msg(request, context)
        statuses = []
        while len(statuses) < len(instances):
            _, reply = assoc.dimse.get_msg(block=True)
            assert reply is not None, f"{len(statuses)} answers of {len(instances)}"
            statuses.append(int(reply.Status))
        return statuses
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()


def test_c_stores_sent_without_waiting_hold_two_spool_files_at_most(w: World) -> None:
    """pynetdicom queues every data set that arrives while its handler is busy, each in
    a spool of its own (a descriptor, and up to the cap of disk): a peer that does not
    wait for the answers held one per C-STORE sent (1,400 descriptors and files for 1,500
    small instances), unbounded by the cap or by ``max_associations``."""
    pid, spool = w.service.process.pid, _spool_of(w.service)
    instances = [_instance(w, MiB) for _ in range(12)]
    failed = _failed_writes(w, "INVALID_ARGUMENT")
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(_spool_files(pid, spool)))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with tls_tunnel(w.modality, w.port) as port:
            statuses = _send_without_waiting(port, instances)
    finally:
        stop.set()
        watcher.join()
    assert peak[0] <= 2, f"{peak[0]} spool files open at once for one association"
    assert set(statuses) <= {0x0000, 0xA700}, f"statuses {sorted(set(statuses))}"
    assert statuses[0] == 0x0000, "the first C-STORE was refused"
    for instance, status in zip(instances, statuses, strict=True):
        assert _index_count(w, instance.sop) == (status == 0x0000), "stored, yet refused"
    refused = statuses.count(0xA700)
    assert _failed_writes(w, "INVALID_ARGUMENT") - failed == refused, "a refusal unaudited"
    wait_for(lambda: not _spool_files(pid, spool), 30, "the spool files' close")


def test_a_c_store_whose_spool_cannot_be_created_is_refused_and_audited(w: World) -> None:
    """The spool folder removed under the running service (or no descriptor left): the
    spool's creation failed inside pynetdicom's reading thread, which died; the peer's
    association dropped with no status, no audit event, and no log naming the setting."""
    spool = _spool_of(w.service)
    instance = _instance(w, MiB)
    unavailable = _failed_writes(w, "UNAVAILABLE")
    spool.rmdir()  # it holds no names
    try:
        with _held(w, instance, None) as (_, sender):
            status = sender.result()
    finally:
        spool.mkdir(mode=0o700)
    assert status == 0xA700, f"a C-STORE with no spool: {status}"
    assert _index_count(w, instance.sop) == 0
    assert _failed_writes(w, "UNAVAILABLE") == unavailable + 1, "the refusal is not audited"
    logged = [json.loads(line) for line in w.service.log_path.read_text().splitlines()
              if '"dicom spool' in line and "cannot" in line]  # fmt: skip
    assert logged, "nothing logged"
    assert logged[-1].get("spool_directory") == str(spool), "the folder unnamed"
