"""Run in a fresh interpreter by test_lazy_imports: sign and verify a CAdES signature with
medvault's own code, with pyHanko loaded at start (``eager``) or on first use (``lazy``),
and print what came out and the state of asn1crypto's OID maps as JSON.

Before the first signature, every OID class of asn1crypto's modules is instantiated, so
every name map (name to OID) is built before pyHanko registers its OIDs: the worst
order any asn1crypto use before a first signature (a CSR made by ``CreateSigner``) can
give.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.unit.service.signing_certs import SoftSigner as _SoftSigner
from tests.unit.service.signing_certs import certificate as _certificate

HEAVY = ("pyhanko", "pyhanko_certvalidator", "aiohttp", "service.signing.cms",
         "service.signing.pades", "service.signing.pyhanko_validation")  # fmt: skip
CONTENT = b"synthetic record for the lazy pyHanko probe"
EMAIL_PROTECTION = ExtendedKeyUsageOID.EMAIL_PROTECTION  # the signer certificate's EKU
# asn1crypto's modules that register nothing in the others' maps (tsp and pdf do).
PLAIN_ASN1CRYPTO = ("algos", "cms", "crl", "csr", "keys", "ocsp", "pkcs12", "x509")
# asn1crypto's AnyAlgorithmId copies three other maps when first instantiated; nothing
# in medvault parses one (a certificate's SupportedAlgorithms attribute) before signing.
COPIES_AT_SETUP = {"asn1crypto.algos.AnyAlgorithmId"}


def _oid_classes() -> list[Any]:
    from asn1crypto import core  # noqa: PLC0415  (after the mode's imports)

    found, pending = [], [core.ObjectIdentifier]
    while pending:
        for sub in pending.pop().__subclasses__():
            if sub not in found:
                found.append(sub)
                pending.append(sub)
    return [c for c in found if f"{c.__module__}.{c.__qualname__}" not in COPIES_AT_SETUP]


def _maps() -> dict[str, Any]:
    """asn1crypto's OID maps, both ways (the reverse map only where the class built it)."""
    return {
        f"{c.__module__}.{c.__qualname__}": [sorted((c._map or {}).items()),
                                              sorted((vars(c).get("_reverse_map") or {}).items())]
        for c in _oid_classes() if c.__module__.startswith("asn1crypto.")
    }  # fmt: skip


def main(mode: str) -> None:
    """Sign and verify once in ``mode`` (``eager`` or ``lazy``); print the result as JSON."""
    if mode == "eager":
        importlib.import_module("pyhanko.sign")  # as medvault did before: pyHanko first
    importlib.import_module("service.server")
    loaded_at_start = sorted(m for m in HEAVY if m in sys.modules)
    for name in PLAIN_ASN1CRYPTO:
        importlib.import_module(f"asn1crypto.{name}")
    for oid_class in _oid_classes():
        oid_class()  # builds its name map now (asn1crypto's _setup)
    from service.signing import SignerIdentity  # noqa: PLC0415
    from service.signing.validation import SignatureValidator  # noqa: PLC0415

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("synthetic probe ca", ca_key)
    signer = _certificate(
        "synthetic probe signer", key, ("synthetic probe ca", ca_key), EMAIL_PROTECTION
    )
    when = datetime.now(UTC).replace(microsecond=0)
    digest = hashlib.sha256(CONTENT).digest()
    p7s = SignerIdentity.load("probe", _SoftSigner(key), signer, []).cades.sign(digest, when)
    verdict = SignatureValidator([ca]).validate(p7s, digest, when)
    json.dump({
        "loaded_at_start": loaded_at_start,
        "loaded_after": sorted(m for m in HEAVY if m in sys.modules),
        "p7s": p7s.hex(), "ca": ca.hex(), "content": CONTENT.hex(),
        "valid": verdict.valid, "reason": verdict.reason,
        "maps": _maps(),
    }, sys.stdout)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
