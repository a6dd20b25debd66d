"""Domain objects of patient-scoped access: care-team and break-the-glass grants.

Frozen; no gRPC, SQLAlchemy, minio or PKCS#11. The patient appears only as its keyed
blind index, never as a plaintext identifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Grant:
    """``principal`` may act on the records of the patient behind ``patient_index``.

    A care-team grant is made by someone else (``granted_by``) and may have no expiry.
    A break-the-glass grant is made by the principal itself, always expires, carries the
    clinician's ``reason`` and waits in the review queue until a security officer
    reviews it (``reviewed_at``, ``reviewed_by``, ``review_comment``).

    ``reason`` and ``review_comment`` are free text typed by people and may mention the
    patient: treat them as sensitive (never log them). They are stored only sealed
    (``storage.grant_seal``) and opened for the security officer alone.
    """

    id: str
    patient_index: bytes
    principal: str
    granted_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None
    break_glass: bool
    reason: str | None
    reviewed_at: datetime | None
    reviewed_by: str | None
    review_comment: str | None

    def active(self, now: datetime) -> bool:
        """Whether the grant gives access at ``now``: not revoked and not yet expired.

        A revocation counts whatever its time: replicas' clocks differ by a little, and
        a revoked grant must not keep working on a replica whose clock lags.
        """
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at

    def answers(
        self, patient_index: bytes | None, principal: str | None, active_at: datetime | None
    ) -> bool:
        """Whether the grant meets a query's conditions: on this patient and of this
        principal where given, and active at ``active_at`` where given.

        The store re-checks each authentic row with it: SQL decides on the bytes stored,
        the MAC covers the values Python reads, and a database writer can make the two
        differ (a view whose column calls ``random()``; on SQLite, another spelling of a
        time, ``storage.sqlite_text``).
        """
        return (
            (patient_index is None or self.patient_index == patient_index)
            and (principal is None or self.principal == principal)
            and (active_at is None or self.active(active_at))
        )
