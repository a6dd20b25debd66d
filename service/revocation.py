"""Client-certificate revocation: a CRL file the operator names, re-read on SIGHUP.

gRPC's Python TLS offers no revocation hook at the handshake, so the check runs once
per call in ``service.authn``: the peer certificate's issuer and serial (from the auth
context) against the CRL in force. The CRL is PEM or DER; its signature must verify
against a certificate of ``[tls] client_ca`` whose subject is the CRL's issuer, so a
file dropped in by someone without the CA key cannot un-revoke anyone (a forged CRL is
refused at start-up and, on reload, the previous one stays in force).

A CRL past its ``nextUpdate`` is still used (it still names every certificate revoked
up to its issue) and a warning is logged at each load: refusing every caller because
the operator published late would turn a paperwork delay into an outage.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from service.errors import ServiceError

log = logging.getLogger(__name__)


class RevocationError(ServiceError):
    """The CRL file is missing, unreadable, or not signed by the client CA."""


@dataclass(frozen=True, slots=True)
class Crl:
    """The revoked serial numbers of one issuer."""

    issuer: bytes  # DER of the issuer's name
    serials: frozenset[int]
    next_update: datetime | None


def _read(path: Path) -> x509.CertificateRevocationList:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RevocationError(f"cannot read CRL file {path}: {e.strerror}") from e
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise RevocationError(f"CRL file {path} is not a CRL (PEM or DER)") from e


def load_crl(path: Path, authorities: Sequence[x509.Certificate]) -> Crl:
    """The CRL at ``path``, its signature checked against one of ``authorities``."""
    crl = _read(path)
    issuer = next((c for c in authorities if c.subject == crl.issuer), None)
    if issuer is None:
        raise RevocationError(f"CRL file {path} is not issued by the client CA")
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise RevocationError(f"CRL file {path}: signature does not verify against the client CA")
    next_update = crl.next_update_utc
    if next_update is not None and next_update < datetime.now(UTC):
        log.warning("CRL is past its nextUpdate; publish a fresh one", extra={"crl": str(path)})
    return Crl(
        issuer=crl.issuer.public_bytes(),
        serials=frozenset(r.serial_number for r in crl),
        next_update=next_update,
    )


def load_authorities(ca_file: Path) -> list[x509.Certificate]:
    """The CA certificates of a PEM bundle (``[tls] client_ca``)."""
    try:
        return x509.load_pem_x509_certificates(ca_file.read_bytes())
    except OSError as e:
        raise RevocationError(f"cannot read client CA file {ca_file}: {e.strerror}") from e
    except ValueError as e:
        raise RevocationError(f"client CA file {ca_file} holds no PEM certificate") from e


class RevocationList:
    """The CRL in force; ``reload`` swaps it only when the new file verifies."""

    def __init__(self, path: Path, authorities: Sequence[x509.Certificate]) -> None:
        self._path = path
        self._authorities = tuple(authorities)
        self._crl = load_crl(path, self._authorities)  # start-up: a bad CRL is fatal
        self._lock = threading.Lock()

    @classmethod
    def from_files(cls, crl_file: Path, ca_file: Path) -> RevocationList:
        """Load the CRL at ``crl_file`` checked against the CA bundle ``ca_file``."""
        return cls(crl_file, load_authorities(ca_file))

    @property
    def current(self) -> Crl:
        """The CRL in force."""
        return self._crl

    def revoked(self, issuer: bytes, serial: int) -> bool:
        """True when the certificate ``serial`` of ``issuer`` (DER name) is revoked."""
        crl = self._crl  # one attribute load: a reload never shows half a list
        return issuer == crl.issuer and serial in crl.serials

    def reload(self) -> bool:
        """Re-read the file: True if swapped in; False (old CRL kept) if it is bad."""
        with self._lock:
            try:
                crl = load_crl(self._path, self._authorities)
            except RevocationError as e:
                log.error("CRL reload failed, keeping the previous CRL: %s", e)  # noqa: TRY400
                return False
            self._crl = crl
        log.info("CRL reloaded", extra={"crl": str(self._path), "revoked": len(crl.serials)})
        return True
