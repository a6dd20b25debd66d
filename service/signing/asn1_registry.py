"""pyHanko's registrations in asn1crypto's OID maps, and why their order matters.

asn1crypto names OIDs through one map per class (``_map``: OID to name) and builds the
reverse map (name to OID, ``_reverse_map``) once, the first time the class is
instantiated, by any parse or build. Several modules add OIDs to those maps when they
are imported:

* asn1crypto's ``tsp`` (``signing_certificate``, ``signing_certificate_v2``, which every
  CAdES and PAdES signature here carries; ``tst_info``) and ``pdf`` (Adobe's OIDs);
* pyHanko's ``sign.ades.cades_asn1`` (CAdES attributes), ``sign.ades.qualified_asn1``
  (``qc_statements``) and ``pdf_utils.crypt._iso32004_asn1`` (PDF MAC);
* pyhanko-certvalidator's ``asn1_types`` (attribute-certificate extensions, ML-DSA).

pyHanko costs about 0.37 s of CPU to import, which most processes (service starts, CLI
commands that build the service's components) never need, so it loads on first use:
the modules that call it (:mod:`service.signing.cms`, :mod:`service.signing.pades`,
:mod:`service.signing.pyhanko_validation`) are imported by the package's other modules
only inside the functions that sign or verify. A reverse map built before that (by a
CSR that ``CreateSigner`` assembled, say) lacks the names registered later, and making
an attribute by such a name fails: when pyHanko was first made lazy,
``signing_certificate_v2`` was unknown and every SignRecord failed INTERNAL. Hence:

* asn1crypto's own registering modules are imported here, at start (well under 1 ms;
  ``service.signing`` imports this module), so the names medvault's CMS code builds
  with are known from the first reverse map on;
* pyHanko's registering modules cannot be imported without it (the ``pyhanko.sign``
  package imports its whole signer on the way, ``pyhanko_certvalidator`` its validator),
  so each module that imports pyHanko calls :func:`complete_name_maps` after its
  imports: every reverse map already built learns the names registered since, and the
  maps end exactly as they would had pyHanko loaded at start (tests/unit/service/
  test_lazy_imports.py compares them). One map is a copy instead: asn1crypto's
  ``AnyAlgorithmId`` copies three others when first instantiated, and it occurs only
  in a certificate's SupportedAlgorithms attribute, which nothing here parses.

A parsed asn1crypto object also keeps the names it resolved, so no object parsed before
pyHanko loads is handed to it: trust anchors and certificates are kept as DER until a
signature is made or checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from asn1crypto import core, pdf, tsp  # noqa: F401  (pdf, tsp: for their registrations)


def _oid_classes() -> Iterator[Any]:  # asn1crypto is untyped
    pending = [core.ObjectIdentifier]
    seen: set[Any] = set()
    while pending:
        for sub in pending.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                pending.append(sub)
                yield sub


def complete_name_maps() -> None:
    """Add to every OID name map asn1crypto has built the names registered since.

    Idempotent; a name already mapped keeps its OID (asn1crypto's own aliases stay).
    """
    for oid_class in _oid_classes():
        # Only a map this class built (a subclass may share its parent's), from the
        # OIDs it resolves (its own or inherited), as asn1crypto's _setup builds it.
        names = vars(oid_class).get("_reverse_map")
        if names is None or oid_class._map is None:
            continue
        # As _setup: a name given to several OIDs maps to the last of them.
        names.update({name: oid for oid, name in oid_class._map.items() if name not in names})
        # pyHanko 0.38's _iso32004_asn1 files "pdf_mac_data" under its OID when it finds
        # the map built; that entry would turn the OID, given as such, into the name.
        for oid in [key for key in names if oid_class._map.get(key) == names[key]]:
            del names[oid]
