"""Who is on a DICOM association: the verified TLS client certificate, as for gRPC.

The peer's certificate chain was verified by the TLS handshake against ``[tls]
client_ca``; here it becomes the same ``CallFacts`` a gRPC call gives the access guard
(``x509_pem_cert``, ``x509_common_name``, the peer address), so the principal, its roles,
the revocation check and the audit of a refusal are those of ``service.authn`` and
``service.guard``. The calling AE title is a label the peer chooses and names nobody.
"""

from __future__ import annotations

import ssl
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from service.guard import CallFacts

# The gRPC methods whose permission (and audit action) each DIMSE service exercises.
STORE = "/medvault.v1.RecordService/PutRecord"  # records.write
FIND = "/medvault.v1.RecordService/ListStudies"  # records.list
GET = "/medvault.v1.RecordService/GetStudy"  # records.read
ECHO = "/medvault.v1.AccessService/WhoAmI"  # access.whoami (C-ECHO answers anyone identified)


def _peer(assoc: Any) -> str:
    address = str(assoc.requestor.address)
    if ":" in address:  # bracketed as gRPC does, so the port can be told from the address
        return f"ipv6:[{address}]:{assoc.requestor.port}"
    return f"ipv4:{address}:{assoc.requestor.port}"


def _common_name(der: bytes) -> list[bytes]:
    try:
        names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
            NameOID.COMMON_NAME
        )
    except ValueError:
        return []
    value = names[0].value if names else b""
    return [value if isinstance(value, bytes) else value.encode()] if value else []


def call_facts(assoc: Any, method: str) -> CallFacts:
    """The transport's view of a DIMSE request on ``assoc`` (a pynetdicom Association)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    auth: dict[str, list[bytes]] = {}
    if isinstance(sock, ssl.SSLSocket):
        der = sock.getpeercert(binary_form=True)
        if der:
            auth = {
                "x509_pem_cert": [ssl.DER_cert_to_PEM_cert(der).encode()],
                "x509_common_name": _common_name(der),
            }
    return CallFacts(method=method, auth_context=auth, metadata=(), peer=_peer(assoc))


def server_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """TLS 1.2+ with a client certificate from ``client_ca`` required (PS3.15 B.1)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
