"""``medvault keys``: the operator's token tools, run at the server's console.

``init-token``, ``create-signer``, ``import-cert`` and ``list`` open the token named by
the config file directly (module, label, PIN file or variable), as ``medvault sweep``
does; they need no running service. Master-key commands (``rotate-kek`` ...) come from
``service.cli.kek_cmd`` and go through the KeyService.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from keystore import Pkcs11SessionPool, ensure_keys
from keystore.admin import SigningKeyKind
from keystore.certificates import (
    create_signer_key,
    import_certificate,
    list_signers,
    make_csr,
)
from service.cli.kek_cmd import register_kek
from service.cli.tables import print_table, utc
from service.config import load


def _config_path(ns: argparse.Namespace) -> str:
    home = os.environ.get("MEDVAULT_HOME", ".medvault")
    return str(ns.config or os.path.join(home, "config.toml"))


def _pool(ns: argparse.Namespace) -> Pkcs11SessionPool:
    from service.bootstrap import keystore_config  # noqa: PLC0415  (light start for others)

    return Pkcs11SessionPool(keystore_config(load(_config_path(ns))))


def cmd_init_token(ns: argparse.Namespace) -> int:
    """Create the KEK, index key and audit key on an initialised token (idempotent)."""
    with _pool(ns) as pool:
        created = ensure_keys(pool, pool.config)
    print("created: " + ", ".join(created) if created else "all keys present")
    return 0


def cmd_create_signer(ns: argparse.Namespace) -> int:
    """Create a signer key (EC P-256, or RSA-2048) and write its CSR."""
    kind: SigningKeyKind = "rsa-2048" if ns.rsa else "ec-p256"
    with _pool(ns) as pool:
        created = create_signer_key(pool, ns.name, kind)
        csr = make_csr(pool, ns.name, ns.subject or f"CN={ns.name}")
    out = Path(ns.csr or f"{ns.name}.csr.pem")
    out.write_bytes(csr)
    state = "created" if created else "exists already (key kept)"
    print(f"signer {ns.name}: key {state}; CSR written to {out}")
    print(f"have your CA sign it, then: medvault keys import-cert {ns.name} CERT.pem")
    return 0


def cmd_import_cert(ns: argparse.Namespace) -> int:
    """Store the CA-signed certificate beside the signer's key."""
    with _pool(ns) as pool:
        cert = import_certificate(pool, ns.name, Path(ns.cert).read_bytes())
    print(f"signer {ns.name}: certificate {cert.subject.rfc4514_string()} "
          f"valid until {utc(cert.not_valid_after_utc)}")  # fmt: skip
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    """Signer keys and their certificates with expiry."""
    with _pool(ns) as pool:
        signers = list_signers(pool)
    rows = [(s.name, s.key_type, s.subject or "(no certificate)",
             utc(s.not_after) if s.not_after else "-") for s in signers]  # fmt: skip
    if not rows:
        print("no signers on the token (medvault keys create-signer NAME)", file=sys.stderr)
        return 0
    print_table(("signer", "key", "certificate subject", "expires"), rows)
    return 0


def register(sub: Any) -> None:
    """Add ``medvault keys ...`` to the CLI (signers here, master keys from kek_cmd)."""
    keys = sub.add_parser("keys", help="token keys, signers and certificates")
    commands = keys.add_subparsers(dest="keys_command", required=True)
    init = commands.add_parser("init-token", help="create medvault's keys on the token")
    init.set_defaults(func=cmd_init_token)
    create = commands.add_parser("create-signer", help="new signer key and its CSR")
    create.add_argument("name")
    create.add_argument("--rsa", action="store_true", help="RSA-2048 instead of EC P-256")
    create.add_argument("--subject", default="", help="RFC 4514 subject (default CN=NAME)")
    create.add_argument("--csr", default="", help="CSR output path (default NAME.csr.pem)")
    create.set_defaults(func=cmd_create_signer)
    imp = commands.add_parser("import-cert", help="store a signer's certificate")
    imp.add_argument("name")
    imp.add_argument("cert", help="certificate file, PEM or DER")
    imp.set_defaults(func=cmd_import_cert)
    lst = commands.add_parser("list", help="signers and certificate expiry")
    lst.set_defaults(func=cmd_list)
    for p in (init, create, imp, lst):
        p.add_argument("--config", help="config file (default $MEDVAULT_HOME/config.toml)")
    register_kek(commands)
