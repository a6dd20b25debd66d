"""Create the stack's token keys (KEK, index key) in a child process.

Why a child process: SoftHSM2 reads ``SOFTHSM2_CONF`` once, when the module is
initialised, and python-pkcs11 initialises a module once per process. Doing this in the
caller's process would pin it to whichever token directory came first, which breaks a
test run (or a tool) that touches two stacks, and would leave a PKCS#11 login behind in
the CLI. The child gets this stack's ``SOFTHSM2_CONF`` and reads the PIN from the PIN
file itself, so the PIN never appears on a command line or in an environment variable.

Run as ``python -m service.localstack.tokenkeys --module M --label L --pin-file F``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from keystore import (
    KeystoreError,
    Pkcs11Config,
    Pkcs11SessionPool,
    SignerNotFoundError,
    create_signer_key,
    ensure_keys,
    import_certificate,
    load_certificate,
    make_csr,
)
from service.localstack.ca import DevCA


class TokenKeysError(RuntimeError):
    """The keys could not be created; the message carries the child's error line."""


def ensure_token_keys(
    module: str,
    label: str,
    pin_file: Path,
    softhsm2_conf: Path,
    *,
    signers: Sequence[str] = (),
    ca_dir: Path | None = None,
) -> list[str]:
    """Create the KEK and index key on ``label`` unless present; return labels created.

    Each of ``signers`` also gets a document-signer key and a certificate from the dev
    CA in ``ca_dir`` (renewed when missing or within 30 days of expiry).
    """
    env = {k: v for k, v in os.environ.items() if k != "MEDVAULT_PIN"}
    env["SOFTHSM2_CONF"] = str(softhsm2_conf)
    command = [
        sys.executable, "-m", "service.localstack.tokenkeys",
        "--module", module, "--label", label, "--pin-file", str(pin_file),
    ]  # fmt: skip
    if signers and ca_dir is not None:
        command += ["--ca-dir", str(ca_dir)]
        for name in signers:
            command += ["--signer", name]
    result = subprocess.run(  # noqa: S603 - fixed argv, no shell, no secret in it
        command, env=env, capture_output=True, text=True, check=False, timeout=120
    )
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise TokenKeysError(f"creating the token keys failed: {detail}")
    return result.stdout.split()


def _ensure_signer(pool: Pkcs11SessionPool, ca: DevCA, name: str) -> bool:
    """Key and dev-CA certificate for signer ``name``; True if anything was (re)made."""
    created = create_signer_key(pool, name)
    try:
        der = load_certificate(pool, name)
        fresh = x509.load_der_x509_certificate(der).not_valid_after_utc > datetime.now(
            UTC
        ) + timedelta(days=30)
    except SignerNotFoundError:
        fresh = False
    if fresh and not created:
        return False
    csr = make_csr(pool, name, f"CN={name},O=medvault development")
    import_certificate(pool, name, ca.issue_signer(csr))
    return True


def main(argv: list[str] | None = None) -> int:
    """Child entry point: open the token and ensure its keys."""
    parser = argparse.ArgumentParser(description="ensure the medvault keys on a token")
    parser.add_argument("--module", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--pin-file", required=True)
    parser.add_argument("--ca-dir", help="development CA that certifies the signers")
    parser.add_argument("--signer", action="append", default=[], help="signer name")
    ns = parser.parse_args(argv)
    # pin_env=None: only the stack's PIN file counts, never an inherited variable.
    config = Pkcs11Config(
        module_path=ns.module, token_label=ns.label, pin_env=None, pin_file=ns.pin_file
    )
    try:
        with Pkcs11SessionPool(config) as pool:
            created = ensure_keys(pool, config)
            if ns.ca_dir:
                ca = DevCA.load_or_create(Path(ns.ca_dir))
                created += [n for n in ns.signer if _ensure_signer(pool, ca, n)]
    except KeystoreError as e:
        print(f"keystore: {e}", file=sys.stderr)
        return 1
    for key_label in created:
        print(key_label)  # labels only: the parent reports what was created
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
