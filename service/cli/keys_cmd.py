"""``medvault keys``: token keys, document signers and certificates.

``create-signer``, ``import-cert`` and ``list`` are KeyService calls made with the
caller's certificate (``key_admin``): authorised and audited under that name, and they
need nothing from the server's machine. Master-key commands (``rotate-kek`` ...) come
from ``service.cli.kek_cmd`` and are KeyService calls too.

``init-token`` runs **locally**: it creates medvault's keys on a token before any service
can start on it, so it opens the token named by the config file (module, label, PIN) and
writes an audit event (``keys.init_token``, principal ``console:<OS user>``) into that
deployment's database.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service._gen.medvault.v1 import keys_pb2 as kpb
from service._gen.medvault.v1 import keys_pb2_grpc as kpb_grpc
from service.cli.client import add_connection_flags, channel
from service.cli.kek_cmd import register_kek
from service.cli.options import config_path
from service.cli.tables import print_table, utc
from service.config import ConfigError

INIT_ACTION = "keys.init_token"
TIMEOUT = 60


def _stub(ns: argparse.Namespace) -> kpb_grpc.KeyServiceStub:
    return kpb_grpc.KeyServiceStub(channel(ns))


def cmd_init_token(ns: argparse.Namespace) -> int:
    """Create the KEK, index key and audit key on an initialised token (idempotent)."""
    from keystore import Pkcs11SessionPool, ensure_keys  # noqa: PLC0415
    from service.bootstrap import keystore_config  # noqa: PLC0415
    from service.cli.restore_cmd import quiet_migrations, record_local_event  # noqa: PLC0415
    from service.config import load  # noqa: PLC0415
    from storage import make_engine, upgrade  # noqa: PLC0415

    quiet_migrations()
    config = load(config_path(ns))
    with Pkcs11SessionPool(keystore_config(config)) as pool:
        created = ensure_keys(pool, pool.config)
        label = pool.config.token_label
    engine = make_engine(config.database.url)
    try:
        upgrade(engine)  # the service would on its first start; the event needs the table
        record_local_event(
            engine, INIT_ACTION, f"token/{label}",
            "created: " + ", ".join(created) if created else "all keys present",
        )  # fmt: skip
    finally:
        engine.dispose()
    print("created: " + ", ".join(created) if created else "all keys present")
    print(f"audit event {INIT_ACTION} written to the deployment's database", file=sys.stderr)
    return 0


def cmd_create_signer(ns: argparse.Namespace) -> int:
    """Create a signer key (EC P-256, or RSA-2048) on the service's token; write its CSR."""
    out = Path(ns.csr or f"{ns.name}.csr.pem")
    if not out.parent.is_dir():
        raise ConfigError(f"--csr {out}: directory {out.parent} does not exist")
    request = kpb.CreateSignerRequest(name=ns.name, rsa=ns.rsa, subject=ns.subject)
    reply = _stub(ns).CreateSigner(request, timeout=TIMEOUT)
    try:
        out.write_bytes(reply.csr_pem)
    except OSError as e:
        raise ConfigError(f"--csr {out}: {e.strerror or e}") from e
    state = "created" if reply.created else "exists already (key kept)"
    print(f"signer {ns.name}: key {state}; CSR written to {out}")
    print(f"have your CA sign it, then: medvault keys import-cert {ns.name} CERT.pem")
    return 0


def cmd_import_cert(ns: argparse.Namespace) -> int:
    """Store the CA-signed certificate beside the signer's key."""
    try:
        data = Path(ns.certificate).read_bytes()
    except OSError as e:
        raise ConfigError(f"certificate {ns.certificate}: {e.strerror or e}") from e
    request = kpb.ImportCertificateRequest(name=ns.name, certificate=data)
    signer = _stub(ns).ImportCertificate(request, timeout=TIMEOUT)
    print(f"signer {ns.name}: certificate {signer.certificate_subject} "
          f"valid until {utc(signer.not_after)}")  # fmt: skip
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    """Signer keys and their certificates with expiry."""
    reply = _stub(ns).ListSigners(kpb.ListSignersRequest(), timeout=TIMEOUT)
    rows = [(s.name, s.key_type, s.certificate_subject or "(no certificate)",
             utc(s.not_after) if s.HasField("not_after") else "-")
            for s in reply.signers]  # fmt: skip
    if not rows:
        print("no signers on the token (medvault keys create-signer NAME)", file=sys.stderr)
        return 0
    print_table(("signer", "key", "certificate subject", "expires"), rows)
    return 0


def register(sub: Any) -> None:
    """Add ``medvault keys ...`` to the CLI (signers here, master keys from kek_cmd)."""
    keys = sub.add_parser("keys", help="token keys, signers and certificates")
    commands = keys.add_subparsers(dest="keys_command", required=True)
    init = commands.add_parser(
        "init-token", help="create medvault's keys on the token (runs locally)",
        description="Runs locally, at the console of the machine holding the token, before "
        "any service can use it: opens the token the config file names (module, label, "
        "PIN file) and the deployment's database, creates the missing keys and writes an "
        "audit event (keys.init_token, principal console:<OS user>) into that database.",
    )  # fmt: skip
    init.add_argument("--config", help="config file (default $MEDVAULT_HOME/config.toml)")
    init.set_defaults(func=cmd_init_token)
    create = commands.add_parser("create-signer", help="new signer key and its CSR")
    create.add_argument("name", help="signer name (letters, digits, '.', '_', '@', '-')")
    create.add_argument("--rsa", action="store_true", help="RSA-2048 instead of EC P-256")
    create.add_argument("--subject", default="", help="RFC 4514 subject (default CN=NAME)")
    create.add_argument("--csr", default="", help="CSR output path (default NAME.csr.pem)")
    create.set_defaults(func=cmd_create_signer)
    imp = commands.add_parser("import-cert", help="store a signer's certificate")
    imp.add_argument("name", help="signer name")
    imp.add_argument("certificate", metavar="CERT", help="certificate file, PEM or DER")
    imp.set_defaults(func=cmd_import_cert)
    lst = commands.add_parser("list", help="signers and certificate expiry")
    lst.set_defaults(func=cmd_list)
    for p in (create, imp, lst):
        add_connection_flags(p)
    register_kek(commands)
