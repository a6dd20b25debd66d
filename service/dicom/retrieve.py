"""The final response of a C-GET: no data set when no sub-operation failed.

pynetdicom (3.0, ``QueryRetrieveServiceClass._get_scp``) gives every final Failure,
Warning or Cancel C-GET response an Identifier holding the Failed SOP Instance UID List,
even an empty one, and counts the sub-operations it never invoked as failed. So a C-GET
refused before its first C-STORE sub-operation (no grant for the patient, a bad
identifier, no match, the trail down) went out as one response, ``0124`` with "1
failed", and then its data set, an empty list, in a P-DATA PDU of its own. PS3.4
C.4.3.1.3.2 says the opposite: when no sub-operation failed the list is absent and no
data set is sent. dcmtk's ``DcmSCU`` (``getscu``, and viewers built on it) never reads a
C-GET response's data set at all: the data set arrived when it expected the
A-RELEASE-RP, and its release failed ("DUL P-Data PDU arrived").

Here the final response is rewritten before it is encoded: an empty list goes, and with
it the data set; and when nothing was invoked at all (no Pending response was sent),
nothing is counted as failed.
A response that names failed instances is sent as pynetdicom builds it.
``install()`` makes pynetdicom serve Study Root C-GET with ``RetrieveServiceClass``
(pynetdicom picks a service class by SOP class UID and has no public way to choose it).
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, cast

import pynetdicom.association
from pydicom.uid import UID
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_GET
from pynetdicom.dsutils import decode
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass, ServiceClass
from pynetdicom.sop_class import uid_to_service_class

STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PENDING = 0xFF00


def _failed_instances(identifier: BytesIO, syntax: UID) -> list[str] | None:
    """The UIDs an Identifier's Failed SOP Instance UID List names; None if it holds
    anything else or does not decode (then it is sent as it is)."""
    try:
        dataset = decode(BytesIO(identifier.getvalue()), syntax.is_implicit_VR,
                         syntax.is_little_endian, syntax.is_deflated)  # fmt: skip
    except Exception:  # noqa: BLE001  (pynetdicom encoded it; if not, it is not ours to fix)
        return None
    if any(element.keyword != "FailedSOPInstanceUIDList" for element in dataset):
        return None
    value: Any = dataset.get("FailedSOPInstanceUIDList")
    if not value:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def final_response(rsp: C_GET, syntax: UID, *, invoked: int) -> C_GET:
    """``rsp`` as it is to be sent: a final response whose Failed SOP Instance UID List is
    empty goes without a data set, and counts no failure if no sub-operation was invoked.

    ``invoked`` is the number of Pending responses sent before it: pynetdicom sends one
    per sub-operation, failed ones included. The list cannot tell: a failed
    sub-operation pynetdicom lists as "" (a handler's yield that is not a data set)
    encodes as the same empty element as no failure at all.
    """
    if rsp.Status == PENDING or rsp.Identifier is None:
        return rsp
    if _failed_instances(rsp.Identifier, syntax) != []:
        return rsp
    rsp.Identifier = None
    if not invoked:
        rsp.NumberOfFailedSuboperations = 0
    return rsp


class _Responses:
    """An association's DIMSE provider, with each C-GET response passed through
    ``final_response`` on its way out (everything else is the provider's own)."""

    def __init__(self, dimse: DIMSEServiceProvider, syntax: UID) -> None:
        self._dimse = dimse
        self._syntax = syntax
        self._pending = 0  # one per sub-operation invoked (one C-GET per instance)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_GET):
            if primitive.Status == PENDING:
                self._pending += 1
            primitive = final_response(primitive, self._syntax, invoked=self._pending)
        self._dimse.send_msg(primitive, context_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dimse, name)


class RetrieveServiceClass(QueryRetrieveServiceClass):
    """pynetdicom's Query/Retrieve service class; its C-GET responses as ``final_response``
    has them."""

    _responses: _Responses | None = None

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        self._responses = _Responses(self.assoc.dimse, UID(context.transfer_syntax[0]))
        super()._get_scp(req, context)

    @property
    def dimse(self) -> DIMSEServiceProvider:
        """The responses of a C-GET go through ``final_response``."""
        if self._responses is None:
            return self.assoc.dimse
        return cast(DIMSEServiceProvider, self._responses)


def _service_class(uid: str) -> type[ServiceClass]:
    return RetrieveServiceClass if uid == STUDY_ROOT_GET else uid_to_service_class(uid)


def install() -> None:
    """Serve Study Root C-GET with ``RetrieveServiceClass`` (idempotent): the association
    looks its service class up by this name, imported from ``pynetdicom.sop_class``."""
    pynetdicom.association.uid_to_service_class = _service_class  # type: ignore[attr-defined]
