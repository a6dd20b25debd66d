"""The coverage-guided fuzz targets (atheris): each parser that reads hostile bytes.

A target takes one input and returns normally when the parser's outcome is one it
documents (acceptance, or its own refusal type); anything else propagates and is the
fuzzer's finding: an undocumented exception type (the caller would see INTERNAL, or a
dropped connection), a failed property, or a hang (libFuzzer's ``-timeout``).
``tests/fuzz/run.py`` runs one; ``tests/fuzz/test_atheris.py`` runs each for a small
budget in CI, ``bench/fuzz.sh --atheris`` for a long one.

- ``dicom``, ``hl7v2``, ``cda``, ``fhir``, ``pdf``: the content validator of the kind,
  fed the input whole and in chunks. Documented: accepted, or ``InvalidRecordError`` on
  ``content`` not quoting the input; one verdict whichever the chunking.
- ``mllp``: MLLP frames off a stream, the MSH envelope, PID-3, the ACK. Documented:
  ``AckError`` (AE/AR); an ACK is always built.
- ``envelope``: a Tink streaming-AEAD ciphertext (header, segments), whole and by
  range. Documented: ``IntegrityError`` (``ValueError`` for a range outside the
  plaintext).
- ``wire``: a gRPC request body of each request type. Documented never to raise: a
  message or a ``Rejected``.
- ``cms``: a detached CMS signature to validate. Documented: a ``Verdict``, never an
  exception. Long runs only (``ci=False``): importing pyHanko alone takes 5 s.

This module imports none of them: the runner imports a target's module inside
atheris's instrumentation, which only instruments what is imported there. Coverage is
collected from the project's own modules a target names; ``MEDVAULT_FUZZ_DEEP=1`` (the
long run) adds the libraries under them. Instrumenting a library instruments its whole
package as it is imported (all of pydicom, say: 10 s and more of start-up on the CI
machine), more than the CI budget has for nine targets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Target:
    """``module:function`` of the target and of its seeds; the project's modules and
    the libraries whose coverage guides it."""

    target: str
    seeds: str
    modules: tuple[str, ...]
    libraries: tuple[str, ...] = ()
    ci: bool = True  # in CI's short budget (tests/fuzz/test_atheris.py)

    def instrumented(self, *, deep: bool) -> list[str]:
        """What atheris instruments: the modules, and the libraries if ``deep``."""
        return [*self.modules, *(self.libraries if deep else ())]


def _format(kind: str, *libraries: str) -> Target:
    return Target(f"tests.fuzz.formats_targets:{kind}",
                  f"tests.fuzz.formats_targets:seeds_{kind}",
                  ("storage.formats",), libraries)  # fmt: skip


TARGETS: dict[str, Target] = {
    "dicom": _format("dicom", "pydicom"),
    "hl7v2": _format("hl7v2", "hl7"),
    "cda": _format("cda"),
    "fhir": _format("fhir"),
    "pdf": _format("pdf"),
    "mllp": Target("tests.fuzz.mllp_target:target", "tests.fuzz.mllp_target:seeds",
                   ("service.mllp", "service.hl7_ack"), ("hl7",)),
    "envelope": Target("tests.fuzz.envelope_target:target", "tests.fuzz.envelope_target:seeds",
                       ("storage.envelope",)),
    "wire": Target("tests.fuzz.wire_target:target", "tests.fuzz.wire_target:seeds",
                   ("service.wire",), ("google.protobuf",)),
    "cms": Target("tests.fuzz.cms_target:target", "tests.fuzz.cms_target:seeds",
                  ("service.signing.validation",), ("asn1crypto", "pyhanko_certvalidator"),
                  ci=False),
}  # fmt: skip
