"""A gRPC channel for the CLI, from flags or the exports of ``medvault stack env``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc

MAX_MESSAGE = 4 << 20


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """Flags naming the endpoint and the client's TLS files (defaults from the environment)."""
    env = os.environ.get
    parser.add_argument("--endpoint", default=env("MEDVAULT_ENDPOINT", "127.0.0.1:7443"))
    parser.add_argument("--ca", default=env("MEDVAULT_CA"), help="CA certificate (PEM)")
    parser.add_argument("--cert", default=env("MEDVAULT_CERT"), help="client certificate (PEM)")
    parser.add_argument("--key", default=env("MEDVAULT_KEY"), help="client private key (PEM)")
    parser.add_argument("--insecure", action="store_true", help="plaintext (TLS disabled server)")


def channel(ns: argparse.Namespace) -> grpc.Channel:
    """Open the channel the flags describe; mutual TLS unless ``--insecure``."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    if ns.insecure:
        return grpc.insecure_channel(ns.endpoint, options=options)
    missing = [flag for flag in ("ca", "cert", "key") if not getattr(ns, flag)]
    if missing:
        raise SystemExit(
            f"medvault: missing --{', --'.join(missing)}; run "
            '`eval "$(medvault stack env)"` or pass the TLS files'
        )
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(ns.ca).read_bytes(),
        private_key=Path(ns.key).read_bytes(),
        certificate_chain=Path(ns.cert).read_bytes(),
    )
    return grpc.secure_channel(ns.endpoint, creds, options=options)
