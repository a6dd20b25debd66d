"""DICOM query keys and C-FIND matching, and each request's patient scope.

What the DIMSE handlers (``service.dicom.scp``) share about a query: the keys of a
C-FIND or C-GET identifier, DA range matching, the responses at STUDY, SERIES and IMAGE
level, and ``Scope``, which checks (and audits) each patient once per request. An
issuer of patient IDs maps to the assigning authority medvault files records under.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from service.authz import PermissionDeniedError
from service.guard import NO_GRANT, AccessGuard, Call
from storage import (
    InvalidRecordError,
    PatientRef,
    RecordInfo,
    RecordRef,
    RecordStore,
    StudyMember,
    StudySummary,
)

MAX_QUERY_STUDIES = 100  # study UIDs in one C-FIND (each is a query of the index)
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+\Z")
_URN_OID = "urn:oid:"


class SkippedError(Exception):
    """A record of a patient already refused (and audited) in this request."""


def authority(issuer: str) -> str:
    """The assigning authority medvault files a DICOM issuer under: an OID as
    ``urn:oid:<OID>`` (the form gRPC headers and FHIR systems use), anything else as is."""
    return _URN_OID + issuer if _OID.match(issuer) else issuer


def issuer(authority_value: str) -> str:
    """The IssuerOfPatientID of an authority (``urn:oid:`` dropped)."""
    if authority_value[: len(_URN_OID)].lower() == _URN_OID:
        return authority_value[len(_URN_OID) :]
    return authority_value


def text(dataset: Dataset, keyword: str) -> str:
    value: Any = dataset.get(keyword)
    return "" if value is None else str(value).strip()


@dataclass
class Scope:
    """Patient scope within one request: each patient checked (and audited) once."""

    guard: AccessGuard
    call: Call
    allowed: set[bytes] = field(default_factory=set)
    refused: set[bytes] = field(default_factory=set)

    def gate(self, ref: RecordRef) -> None:
        """Admit a record of an allowed patient; the first of each patient is audited."""
        if ref.patient_index in self.allowed:
            return
        if ref.patient_index in self.refused:
            raise SkippedError
        try:
            self.guard.patient_gate(self.call)(ref)
        except PermissionDeniedError:
            self.refused.add(ref.patient_index)
            raise
        self.allowed.add(ref.patient_index)

    def check_only(self, ref: RecordRef) -> None:
        """Scope only (a refusal is audited, an allowance is audited at the read)."""
        if ref.patient_index in self.allowed:
            return
        if ref.patient_index in self.refused:
            raise SkippedError
        try:
            self.guard.check_scope(self.call, ref)
        except PermissionDeniedError:
            self.refused.add(ref.patient_index)
            raise
        self.allowed.add(ref.patient_index)


def _values(query: Dataset, keyword: str) -> list[str]:
    """A key's values (a UID list is multi-valued); [] when empty (universal matching)."""
    value: Any = query.get(keyword)
    if value is None:
        return []
    items = str(value).split("\\") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def retrieve_keys(query: Dataset) -> tuple[str, set[str], set[str]]:
    studies = _values(query, "StudyInstanceUID")
    if len(studies) != 1:
        raise InvalidRecordError("StudyInstanceUID", "one study UID is required")
    return (
        studies[0],
        set(_values(query, "SeriesInstanceUID")),
        set(_values(query, "SOPInstanceUID")),
    )


def _date_match(wanted: str, day: str) -> bool:
    """DA matching: a single date or a range ``A-B`` (either side may be open)."""
    if not wanted:
        return True
    low, dash, high = wanted.replace(" ", "").partition("-")
    if not dash:
        return day == low
    return bool(day) and (not low or low <= day) and (not high or day <= high)


def _reply(query: Dataset, level: str, known: dict[str, Any]) -> Dataset:
    """The requested keys with the values known for this match (others empty)."""
    reply = Dataset()
    reply.QueryRetrieveLevel = level
    for element in query:
        keyword = element.keyword
        if keyword and keyword != "QueryRetrieveLevel":
            setattr(reply, keyword, known.get(keyword, ""))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if keyword in known and keyword not in reply:
            setattr(reply, keyword, known[keyword])
    return reply


def _patient_keys(patient: PatientRef) -> dict[str, Any]:
    return {"PatientID": patient.id, "IssuerOfPatientID": issuer(patient.authority)}


def _study_reply(query: Dataset, s: StudySummary, patient: PatientRef) -> Dataset:
    return _reply(query, "STUDY", {
        **_patient_keys(patient), "StudyInstanceUID": s.study_uid, "StudyDate": s.study_date,
        "ModalitiesInStudy": list(s.modalities) or "",
        "NumberOfStudyRelatedSeries": s.series_count,
        "NumberOfStudyRelatedInstances": s.instance_count,
    })  # fmt: skip


def find_matches(store: RecordStore, guard: AccessGuard, call: Call, query: Dataset
                 ) -> list[Dataset]:  # fmt: skip
    """The C-FIND responses for ``query``; every record read is scope-checked and audited."""
    level = text(query, "QueryRetrieveLevel").upper()
    studies = _values(query, "StudyInstanceUID")
    date, modality = text(query, "StudyDate"), text(query, "ModalitiesInStudy")
    if level == "STUDY" and not studies:
        pid, issued = text(query, "PatientID"), text(query, "IssuerOfPatientID")
        if not pid or not issued or "*" in pid or "?" in pid:
            raise InvalidRecordError(
                "identifier", "give StudyInstanceUID, or PatientID and IssuerOfPatientID"
            )
        patient = PatientRef(pid, authority(issued))
        found = store.studies(patient, admit=guard.patient_gate(call))
        return [
            _study_reply(query, s, patient) for s in found
            if _date_match(date, s.study_date) and (not modality or modality in s.modalities)
        ]  # fmt: skip
    if level not in ("STUDY", "SERIES", "IMAGE"):
        raise InvalidRecordError("QueryRetrieveLevel", "must be STUDY, SERIES or IMAGE")
    if not studies or (level != "STUDY" and len(studies) != 1):
        raise InvalidRecordError("StudyInstanceUID", "is required below STUDY level (one UID)")
    if len(studies) > MAX_QUERY_STUDIES:
        raise InvalidRecordError("StudyInstanceUID", f"at most {MAX_QUERY_STUDIES} UIDs per query")
    replies: list[Dataset] = []
    refused = False
    for study in studies:
        scope = Scope(guard, call)
        members: list[tuple[StudyMember, RecordInfo]] = []
        for member in store.study_members(study):
            try:
                members.append((member, store.stat(member.id, member.version, admit=scope.gate)))
            except (PermissionDeniedError, SkippedError):
                continue
        replies += _level_replies(query, level, study, members)
        refused = refused or bool(scope.refused)
    if not replies and refused:
        raise PermissionDeniedError(NO_GRANT)  # each patient's refusal is audited
    return replies


def _level_replies(query: Dataset, level: str, study: str,
                   members: list[tuple[StudyMember, RecordInfo]]) -> list[Dataset]:  # fmt: skip
    if not members:
        return []
    patient = members[0][1].patient
    if level == "STUDY":
        dates = sorted(m.study_date for m, _ in members if m.study_date)
        summary = StudySummary(
            study, dates[0] if dates else "", tuple(sorted({m.modality for m, _ in members})),
            len({m.series_uid for m, _ in members}), len(members),
        )  # fmt: skip
        date, modality = text(query, "StudyDate"), text(query, "ModalitiesInStudy")
        if not _date_match(date, summary.study_date) or (
            modality and modality not in summary.modalities
        ):
            return []
        return [_study_reply(query, summary, patient)]
    series_wanted = set(_values(query, "SeriesInstanceUID"))
    modality = text(query, "Modality")
    chosen = [
        (m, i) for m, i in members
        if (not series_wanted or m.series_uid in series_wanted)
        and (not modality or m.modality == modality)
    ]  # fmt: skip
    base = {**_patient_keys(patient), "StudyInstanceUID": study}
    if level == "SERIES":
        by_series: dict[str, list[StudyMember]] = {}
        for m, _ in chosen:
            by_series.setdefault(m.series_uid, []).append(m)
        return [
            _reply(query, "SERIES", {**base, "SeriesInstanceUID": uid,
                                     "Modality": items[0].modality,
                                     "NumberOfSeriesRelatedInstances": len(items)})
            for uid, items in by_series.items()
        ]  # fmt: skip
    sops = set(_values(query, "SOPInstanceUID"))
    return [
        _reply(query, "IMAGE", {**base, "SeriesInstanceUID": m.series_uid,
                                "SOPInstanceUID": m.sop_uid, "SOPClassUID": m.sop_class})
        for m, _ in chosen if not sops or m.sop_uid in sops
    ]  # fmt: skip
