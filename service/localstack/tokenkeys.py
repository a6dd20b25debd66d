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
from pathlib import Path

from keystore import Pkcs11Config, Pkcs11SessionPool, ensure_keys
from keystore.errors import KeystoreError


class TokenKeysError(RuntimeError):
    """The keys could not be created; the message carries the child's error line."""


def ensure_token_keys(module: str, label: str, pin_file: Path, softhsm2_conf: Path) -> list[str]:
    """Create the KEK and index key on ``label`` unless present; return labels created."""
    env = {k: v for k, v in os.environ.items() if k != "MEDVAULT_PIN"}
    env["SOFTHSM2_CONF"] = str(softhsm2_conf)
    command = [
        sys.executable, "-m", "service.localstack.tokenkeys",
        "--module", module, "--label", label, "--pin-file", str(pin_file),
    ]  # fmt: skip
    result = subprocess.run(  # noqa: S603 - fixed argv, no shell, no secret in it
        command, env=env, capture_output=True, text=True, check=False, timeout=120
    )
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise TokenKeysError(f"creating the token keys failed: {detail}")
    return result.stdout.split()


def main(argv: list[str] | None = None) -> int:
    """Child entry point: open the token and ensure its keys."""
    parser = argparse.ArgumentParser(description="ensure the medvault keys on a token")
    parser.add_argument("--module", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--pin-file", required=True)
    ns = parser.parse_args(argv)
    # pin_env=None: only the stack's PIN file counts, never an inherited variable.
    config = Pkcs11Config(
        module_path=ns.module, token_label=ns.label, pin_env=None, pin_file=ns.pin_file
    )
    try:
        with Pkcs11SessionPool(config) as pool:
            created = ensure_keys(pool, config)
    except KeystoreError as e:
        print(f"keystore: {e}", file=sys.stderr)
        return 1
    for key_label in created:
        print(key_label)  # labels only: the parent reports what was created
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
