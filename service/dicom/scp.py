"""The DIMSE services: C-ECHO, C-STORE, C-FIND and C-GET over the records use case.

Each request is entered through the access guard as the gRPC call it corresponds to
(``service.dicom.identity``): C-STORE is a PutRecord (``records.write``), C-FIND a
ListStudies (``records.list``), C-GET a GetStudy (``records.read``). So the principal,
its permissions, its patient scope, and the audit events (allowed, denied, failed) are
those of the gRPC service, and every refusal is answered with a DICOM failure status
carrying a short ErrorComment that names the problem, never a value from the data.

pynetdicom runs each association in a thread of its own and calls these handlers there;
the guard and the store block, which is what they expect.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset

from service.audit import AuditUnavailableError
from service.authn import AuthenticationError
from service.authz import PermissionDeniedError
from service.dicom.identity import ECHO, FIND, GET, STORE, call_facts
from service.dicom.query import (
    Scope,
    SkippedError,
    authority,
    find_matches,
    retrieve_keys,
    text,
)
from service.dicom.spool import BoundedSpool, received
from service.guard import NO_GRANT, AccessGuard, Call
from service.limits import TooManyCallsError
from service.status import status_for
from storage import (
    BackendUnavailableError,
    InvalidRecordError,
    NewRecord,
    PatientRef,
    RecordConflictError,
    RecordInfo,
    RecordKind,
    RecordRef,
    RecordStore,
    StudyMember,
)

log = logging.getLogger(__name__)

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
NOT_AUTHORISED = 0x0124  # PS3.7 C: Refused: Not Authorized
PROCESSING_FAILURE = 0x0110
DUPLICATE_INSTANCE = 0x0111  # PS3.7 C: Duplicate SOP Instance
OUT_OF_RESOURCES = 0xA700  # C-STORE and C-FIND
GET_OUT_OF_RESOURCES = 0xA702  # C-GET: unable to perform sub-operations
DOES_NOT_MATCH = 0xA900  # the data set / identifier does not match the SOP class
CANNOT_UNDERSTAND = 0xC000  # C-STORE: cannot understand; C-FIND/C-GET: unable to process
CHUNK = 1 << 20
# Already audited by the guard (denials) or impossible to audit (the trail is down).
_NOT_AUDITED_AGAIN = (
    PermissionDeniedError, AuthenticationError, AuditUnavailableError, TooManyCallsError,
)  # fmt: skip
_PATIENT_TAGS = ("PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
                 "SOPClassUID", "SOPInstanceUID")  # fmt: skip


Status = int | Dataset  # a status code, or a Dataset with Status and ErrorComment
Reply = tuple[Status, Dataset | None]


def _spool_refusal(spooled: BoundedSpool, cap: int) -> Exception | None:
    """Why a received data set is refused before it is read (A700), if it is."""
    if spooled.busy:  # the peer sent it before the previous C-STOREs were answered
        return InvalidRecordError("content", "sent before the previous C-STORE was answered")
    if spooled.failed:  # logged with the folder; the peer may send it again later
        return BackendUnavailableError("the DICOM spool could not keep the data set")
    if spooled.oversized or spooled.size > cap:
        return InvalidRecordError("content", f"exceeds the DICOM instance limit of {cap} bytes")
    return None


def _comment(status: int, text: str) -> Dataset:
    """A failure status with an ErrorComment (LO: at most 64 characters)."""
    reply = Dataset()
    reply.Status = status
    reply.ErrorComment = text[:64]
    return reply


def instance_key(sop_instance: str) -> str:
    """The PutRecord request id of a C-STORE: a sender that sends an instance again (a
    retry after a lost response) gets the first put's record, not a second record, while
    ``server.request_id_retention_hours`` remembers it; the same UID with other content
    is refused (Duplicate SOP Instance)."""
    return "dicom." + hashlib.sha256(sop_instance.encode()).hexdigest()[:48]


def instance_patient(
    path: Path | BinaryIO, command: tuple[str, str] | None = None
) -> tuple[PatientRef, str]:
    """The patient and SOP Instance UID a DICOM data set or Part 10 file (a path, or a
    file open from its start) names.

    With ``command`` (SOP Class and Instance UIDs of a C-STORE), the data set must be
    that instance. ``medvault import-dicom`` reads files with it, so a CD's instances are
    filed exactly as a C-STORE of them would be.
    """
    try:
        with warnings.catch_warnings():  # pydicom's guesses about a malformed file
            warnings.simplefilter("ignore")
            dataset = dcmread(path, stop_before_pixels=True, defer_size=16 << 10,
                              specific_tags=list(_PATIENT_TAGS))  # fmt: skip
        values = {k: text(dataset, k) for k in _PATIENT_TAGS[:2] + _PATIENT_TAGS[3:]}
        qualifiers = list(dataset.get("IssuerOfPatientIDQualifiersSequence") or [])
        universal = [text(q, "UniversalEntityID") for q in qualifiers]
    except Exception as e:
        raise InvalidRecordError("content", "is not DICOM: the data set does not parse") from e
    if not values["SOPClassUID"] or not values["SOPInstanceUID"]:
        raise InvalidRecordError("content", "does not parse as DICOM: no SOP Class/Instance UID")
    if command is not None and (values["SOPClassUID"], values["SOPInstanceUID"]) != command:
        raise InvalidRecordError(
            "content", "SOP Class/Instance UID differ from the C-STORE command's"
        )
    if not values["PatientID"]:
        raise InvalidRecordError("content", "DICOM: PatientID (0010,0020) is missing or empty")
    found = values["IssuerOfPatientID"] or next((u for u in universal if u), "")
    if not found:
        raise InvalidRecordError("content", "DICOM: IssuerOfPatientID (0010,0021) is missing")
    return PatientRef(values["PatientID"], authority(found)), values["SOPInstanceUID"]


def patient_of(path: Path | BinaryIO, sop_class: str, sop_instance: str) -> PatientRef:
    """The patient a received instance names; it must be the instance the command names."""
    return instance_patient(path, (sop_class, sop_instance))[0]


class DimseHandlers:
    """The pynetdicom event handlers over the record store, behind the access guard."""

    def __init__(self, store: RecordStore, guard: AccessGuard, max_instance_size: int) -> None:
        self._store = store
        self._guard = guard
        self._cap = max_instance_size

    # --- shared --------------------------------------------------------------------

    def _enter(self, event: Any, method: str) -> Call:
        return self._guard.enter(call_facts(event.assoc, method))

    def _refused(self, call: Call, resource: str, error: Exception, status: int,
                 unavailable: int = OUT_OF_RESOURCES) -> Dataset:  # fmt: skip
        """Audit the failure of an allowed request (unless already audited); its status:
        ``status`` for bad input, ``unavailable`` when a dependency is down."""
        code, message = status_for(error)
        if not isinstance(error, _NOT_AUDITED_AGAIN):
            self._guard.audit_failure(call, resource, code.name, message)
        if isinstance(error, PermissionDeniedError | AuthenticationError):
            return _comment(NOT_AUTHORISED, message)
        if isinstance(error, AuditUnavailableError | BackendUnavailableError):
            return _comment(unavailable, "service unavailable, try again")
        if not isinstance(error, InvalidRecordError | RecordConflictError):
            log.warning("DIMSE request failed", extra={"error": type(error).__name__})
            return _comment(PROCESSING_FAILURE, message)
        return _comment(status, message)

    def _members(self, study_uid: str, admit: Callable[[RecordRef], None]
                 ) -> list[tuple[StudyMember, RecordInfo]]:  # fmt: skip
        """The instances of a study within the caller's scope, each row verified."""
        found: list[tuple[StudyMember, RecordInfo]] = []
        for member in self._store.study_members(study_uid):
            try:
                found.append((member, self._store.stat(member.id, member.version, admit=admit)))
            except (PermissionDeniedError, SkippedError):
                continue
        return found

    # --- C-ECHO --------------------------------------------------------------------

    def on_echo(self, event: Any) -> int:
        """Success for a peer whose certificate names a principal."""
        try:
            self._guard.identify(call_facts(event.assoc, ECHO))
        except (AuthenticationError, PermissionDeniedError):
            return NOT_AUTHORISED
        return SUCCESS

    # --- C-STORE -------------------------------------------------------------------

    def on_store(self, event: Any) -> int | Dataset:
        """Store the received instance as a DICOM record of the patient it names."""
        try:
            call = self._enter(event, STORE)
        except (AuthenticationError, PermissionDeniedError) as e:
            return _comment(NOT_AUTHORISED, str(e))
        request = event.request
        try:
            # The data set as pynetdicom spooled it: sealed, read back through its reader.
            spooled = received(event.dataset_path)
            if refusal := _spool_refusal(spooled, self._cap):
                return self._refused(call, "record/new", refusal, OUT_OF_RESOURCES)
            with spooled.reader() as f:
                patient = patient_of(
                    f, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
                )
            header = NewRecord(
                patient,
                RecordKind.DICOM,
                "application/dicom",
                request_id=instance_key(str(request.AffectedSOPInstanceUID)),
            )
            with spooled.reader() as f:
                self._store.put(
                    header, iter(lambda: f.read(CHUNK), b""), call.principal.name,
                    admit=self._guard.scope_gate(call),
                    on_commit=self._guard.commit_gate(call),
                    on_replay=self._guard.replay_gate(call),
                )  # fmt: skip
        except Exception as e:  # noqa: BLE001  (every error leaves as a DICOM status)
            # Content that does not parse: cannot understand; else it does not match.
            status = CANNOT_UNDERSTAND if "parse" in str(e) else DOES_NOT_MATCH
            if isinstance(e, RecordConflictError):  # the UID again, with other content
                status = DUPLICATE_INSTANCE
            return self._refused(call, "record/new", e, status)
        return SUCCESS

    # --- C-FIND --------------------------------------------------------------------

    def on_find(self, event: Any) -> Iterator[Reply]:
        """Study Root C-FIND at STUDY, SERIES and IMAGE level, within the caller's scope."""
        try:
            call = self._enter(event, FIND)
        except (AuthenticationError, PermissionDeniedError) as e:
            yield _comment(NOT_AUTHORISED, str(e)), None
            return
        try:
            query = event.identifier
            matches = find_matches(self._store, self._guard, call, query)
        except Exception as e:  # noqa: BLE001
            yield self._refused(call, "patient-studies", e, CANNOT_UNDERSTAND), None
            return
        for match in matches:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, match
        yield SUCCESS, None

    # --- C-GET ---------------------------------------------------------------------

    def _get_members(self, call: Call, query: Dataset) -> list[tuple[StudyMember, RecordInfo]]:
        """The instances a C-GET names that the caller may read (refusals audited)."""
        study, series, sops = retrieve_keys(query)
        scope = Scope(self._guard, call)
        members = [
            (m, info) for m, info in self._members(study, scope.check_only)
            if (not series or m.series_uid in series) and (not sops or m.sop_uid in sops)
        ]  # fmt: skip
        if not members and scope.refused:
            raise PermissionDeniedError(NO_GRANT)  # each patient's refusal is audited
        if not members:
            raise InvalidRecordError("StudyInstanceUID", "no instance matches")
        return members

    def _read(self, call: Call, member: StudyMember, info: RecordInfo) -> Dataset:
        """One instance as stored (its read audited), in memory up to the cap."""
        if info.size > self._cap:
            raise InvalidRecordError(
                "content", f"instance exceeds the C-GET limit of {self._cap} bytes"
            )
        # Fetched while the read event commits; nothing is returned (and so sent) before
        # the commit, as GetRecord does (service.guard.ReadAdmission).
        admission = self._guard.read_admission(call)
        try:
            opened = self._store.open(member.id, member.version, admit=admission.gate)
            content = b"".join(opened.content)
        finally:
            admission.wait()
        return dcmread(io.BytesIO(content))

    def on_get(self, event: Any) -> Iterator[int | Reply]:
        """Study Root C-GET: the instances of a study (or series, or instances) the caller
        may read, each as it was stored, each read audited."""
        # pynetdicom takes the number of sub-operations first, and answers 0 with Success:
        # a refusal gives 1, then its status. The one final response then goes without a
        # data set and counts nothing failed (service.dicom.retrieve).
        try:
            call = self._enter(event, GET)
        except (AuthenticationError, PermissionDeniedError) as e:
            yield 1
            yield _comment(NOT_AUTHORISED, str(e)), None
            return
        try:
            members = self._get_members(call, event.identifier)
        except Exception as e:  # noqa: BLE001
            yield 1
            yield self._refused(call, "study", e, CANNOT_UNDERSTAND, GET_OUT_OF_RESOURCES), None
            return
        yield len(members)
        for member, info in members:
            if event.is_cancelled:
                yield CANCEL, None
                return
            try:
                dataset = self._read(call, member, info)
            except Exception as e:  # noqa: BLE001
                # A702 whether the instance is over the cap or the trail is down: A700 is
                # no C-GET status (pynetdicom sent it as an unknown one).
                resource = f"record/{member.id}/v{member.version}"
                yield self._refused(call, resource, e, GET_OUT_OF_RESOURCES,
                                    GET_OUT_OF_RESOURCES), None  # fmt: skip
                return
            yield PENDING, dataset
