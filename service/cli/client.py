"""A gRPC channel for the CLI, from flags or the exports of ``medvault stack env``.

Everything that can be checked before a call is checked here, each failure one line
naming the flag and the file: the TLS files must be readable PEM, the key must belong
to the certificate, and the certificate must be valid now. A call that then fails to
connect is explained by :func:`describe_rpc_error` (nothing listening, unknown CA,
expired certificate, server name mismatch, not a gRPC port) instead of gRPC's text.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from service import allocator
from service.cli.targets import EndpointError, parse

MAX_MESSAGE = 4 << 20
_ENV = {"endpoint": "MEDVAULT_ENDPOINT", "ca": "MEDVAULT_CA", "cert": "MEDVAULT_CERT",
        "key": "MEDVAULT_KEY"}  # fmt: skip
_STACK_CLIENT = "local-admin"
_SETUP_HINT = (
    "set MEDVAULT_ENDPOINT, MEDVAULT_CA, MEDVAULT_CERT and MEDVAULT_KEY (or pass --endpoint, "
    '--ca, --cert, --key); for a local stack run `medvault stack up`, then `eval "$(medvault '
    'stack env)"`'
)


@dataclass
class _Target:
    """What the last channel was opened to, for explaining its failures."""

    endpoint: str = ""
    ca: str = ""
    cert: str = ""


_last = _Target()


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """Flags naming the endpoint and the client's TLS files (defaults from the environment)."""
    parser.add_argument(
        "--endpoint",
        help="HOST:PORT of the medvault service, or HOST:PORT,HOST:PORT,... of its replicas "
        "(calls are balanced over them and reads retried on another; default "
        "$MEDVAULT_ENDPOINT, else the local stack in $MEDVAULT_HOME or ./.medvault)",
    )
    parser.add_argument(
        "--ca", help="CA certificate that signed the server's certificate (PEM; default "
        "$MEDVAULT_CA)",
    )  # fmt: skip
    parser.add_argument("--cert", help="your client certificate (PEM; default $MEDVAULT_CERT)")
    parser.add_argument(
        "--key", help="the private key of --cert (PEM, unencrypted; default $MEDVAULT_KEY)"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext, for a server with TLS disabled"
    )


def _setting(ns: argparse.Namespace, name: str) -> str:
    return str(getattr(ns, name, None) or os.environ.get(_ENV[name]) or "")


def _from_local_stack(ns: argparse.Namespace, tls: dict[str, str]) -> str:
    """The endpoint of the local stack (and its admin's TLS files when none are named)."""
    from service.localstack.cluster import open_stack  # noqa: PLC0415 - only without an endpoint
    from service.localstack.stack import LocalStackError, default_home  # noqa: PLC0415

    home = default_home()
    if not (home / "config.toml").is_file():
        where = "$MEDVAULT_HOME" if os.environ.get("MEDVAULT_HOME") else "./.medvault"
        raise SystemExit(f"medvault: no service named and no local stack in {home} ({where}); "
                         f"{_SETUP_HINT}")  # fmt: skip
    try:
        stack = open_stack(home)
        endpoint = stack.endpoint()
        who = ""
        if not any(tls.values()) and not ns.insecure:
            files = stack.tls_client(_STACK_CLIENT)
            tls.update(ca=str(files.ca), cert=str(files.cert), key=str(files.key))
            who = f" as {_STACK_CLIENT}"
    except LocalStackError as e:
        raise SystemExit(f"medvault: local stack in {home}: {e}") from None
    print(f"medvault: MEDVAULT_ENDPOINT is not set; using the local stack in {home} "
          f"({endpoint}){who}", file=sys.stderr)  # fmt: skip
    return endpoint


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SystemExit(f"medvault: cannot read --{flag} {path}: {e.strerror}") from None


def _check_tls_files(ca_path: str, cert_path: str, key_path: str) -> tuple[bytes, bytes, bytes]:
    """The three files' bytes, once each is the PEM it should be and the pair matches."""
    ca, cert_pem, key_pem = _read("ca", ca_path), _read("cert", cert_path), _read("key", key_path)
    try:
        x509.load_pem_x509_certificates(ca)
    except ValueError:
        raise SystemExit(f"medvault: --ca {ca_path} is not a PEM certificate") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise SystemExit(f"medvault: --cert {cert_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise SystemExit(
            f"medvault: --key {key_path} is not an unencrypted PEM private key"
        ) from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise SystemExit(f"medvault: --key {key_path} is not the key of --cert {cert_path}")
    now = datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        raise SystemExit(
            f"medvault: your certificate --cert {cert_path} expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; ask for a new one (local stack: "
            "`medvault stack up` renews it)"
        )
    if cert.not_valid_before_utc > now:
        raise SystemExit(
            f"medvault: your certificate --cert {cert_path} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock)"
        )
    return ca, cert_pem, key_pem


def channel(ns: argparse.Namespace) -> grpc.Channel:
    """Open the channel the flags describe; mutual TLS unless ``--insecure``."""
    allocator.tune()  # messages of up to a chunk are (de)serialised on this thread
    tls = {flag: _setting(ns, flag) for flag in ("ca", "cert", "key")}
    endpoint = _setting(ns, "endpoint") or _from_local_stack(ns, tls)
    try:
        target = parse(endpoint)
    except EndpointError as e:
        raise SystemExit(f"medvault: {e}") from None
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        *target.options(),
    ]
    _last.endpoint, _last.ca, _last.cert = endpoint, tls["ca"], tls["cert"]
    if ns.insecure:
        return grpc.insecure_channel(target.target, options=options)
    missing = [flag for flag, value in tls.items() if not value]
    if missing:
        names = ", ".join(f"--{flag} (or {_ENV[flag]})" for flag in missing)
        raise SystemExit(f'medvault: missing {names}; run `eval "$(medvault stack env)"` '
                         "or pass the TLS files")  # fmt: skip
    ca, cert, key = _check_tls_files(tls["ca"], tls["cert"], tls["key"])
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(target.target, creds, options=options)


# Substrings of gRPC's connection errors (C-core and BoringSSL wording), first match wins.
_CONNECT_REASONS = (
    ("Connection refused", "nothing is listening there (is the service running? "
     "`medvault stack status` shows a local stack)"),
    ("certificate has expired", "the server's certificate has expired"),
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate is not signed by --ca {ca} "
     "(unknown CA: is this the right --ca for this server?)"),
    ("Hostname Verification", "the server's certificate does not name {host} (server name "
     "mismatch: connect with a name its certificate lists, e.g. localhost or 127.0.0.1)"),
    ("WRONG_VERSION_NUMBER", "it does not speak TLS (not a medvault gRPC port?)"),
    ("Trying to connect an http1.x server", "it is not a gRPC port"),
    ("Socket closed", "the server ended the TLS handshake: it does not accept your certificate "
     "{cert} (issued by another CA, expired or revoked), or it is not a medvault gRPC port"),
    ("Connection reset", "the server reset the connection (not a medvault gRPC port, or TLS "
     "expected by one side only)"),
    ("DNS resolution failed", "its host name does not resolve"),
    ("Failed to create security handshaker", "the TLS files were not accepted"),
)  # fmt: skip


def describe_rpc_error(e: grpc.RpcError) -> str:
    """One line for a failed call: the status and message, or why no connection was made."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and _last.endpoint:
        for needle, reason in _CONNECT_REASONS:
            if needle in details:
                first = _last.endpoint.split(",")[0]
                host = first.rpartition(":")[0] or first
                text = reason.format(ca=_last.ca, cert=_last.cert, host=host)
                return f"medvault: cannot connect to {_last.endpoint}: {text}"
    first_line = details.splitlines()[0] if details else ""
    return f"medvault: {code.name}: {first_line}"
