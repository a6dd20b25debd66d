"""The FHIR AuditEvent export of a real trail, read by an independent FHIR model.

A grant, a break-the-glass and reads over TLS from 127.0.0.1 are exported through
``ExportEvents``; every line must parse as an R4 AuditEvent (``fhir.resources``' R4B
model, whose AuditEvent is R4's), carry a bare IP address, and code grants and
break-the-glass as Security Alerts with their DICOM subtypes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from service.audit.export import DCM
from tests.integration.access.helpers import TIMEOUT, client, grant, new_patient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_fhir_export_of_grants_and_break_glass(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    service = service_factory(fresh_database)
    officer = client(service, issue("officer-fhir", "security_officer"))
    clerk = client(service, issue("clerk-fhir", "records_clerk"))
    dr = client(service, issue("dr-fhir", "physician"))
    try:
        grant(clerk, new_patient(), "dr-fhir")
        dr.access.BreakGlass(apb.BreakGlassRequest(
            patient=new_patient(), reason="synthetic emergency (test)"), timeout=TIMEOUT)
        request = aupb.ExportEventsRequest(
            query=aupb.QueryEventsRequest(), format=aupb.EXPORT_FORMAT_FHIR
        )
        data = b"".join(c.data for c in officer.audit.ExportEvents(request, timeout=120))
    finally:
        for c in (officer, clerk, dr):
            c.close()
        service.stop()

    by_action: dict[str, dict[str, Any]] = {}
    for line in data.decode("utf-8").splitlines():
        AuditEvent.model_validate_json(line)  # raises on anything R4 does not allow
        resource = json.loads(line)
        by_action[resource["subtype"][-1]["code"]] = resource
        network = resource["agent"][0].get("network")
        assert network == {"address": "127.0.0.1", "type": "2"}, "not a bare IP address"
    glass, granted = by_action["access.break_glass"], by_action["access.grant"]
    assert glass["type"]["code"] == granted["type"]["code"] == "110113", "not Security Alert"
    assert glass["subtype"][0] == {
        "system": DCM, "code": "110127", "display": "Emergency Override Started"
    }, "break-the-glass lacks its DICOM subtype"
    assert granted["subtype"][0]["code"] == "110136", "a grant lacks its DICOM subtype"
