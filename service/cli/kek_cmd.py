"""``medvault keys rotate-kek|keks|rewrap|retire-kek``: the master-key lifecycle.

Registered under ``medvault keys`` by ``service.cli.keys_cmd`` through
:func:`register_kek`. Every command calls the KeyService as a ``key_admin``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC
from typing import Never

import grpc
from tqdm import tqdm

from service._gen.medvault.v1 import keys_pb2 as kpb
from service._gen.medvault.v1 import keys_pb2_grpc as kpb_grpc
from service.cli.client import add_connection_flags, channel
from service.cli.options import non_negative_int, positive_int
from service.cli.tables import print_table

# Rewrap is a long server stream; unary calls get a deadline.
TIMEOUT = 60


def _stub(ns: argparse.Namespace) -> kpb_grpc.KeyServiceStub:
    return kpb_grpc.KeyServiceStub(channel(ns))


def _created(version: kpb.KekVersion) -> str:
    if not version.HasField("created_at"):
        return ""
    return version.created_at.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_rotate(ns: argparse.Namespace) -> int:
    """Create the next KEK version; new writes use it at once."""
    reply = _stub(ns).RotateKek(kpb.RotateKekRequest(), timeout=TIMEOUT)
    print(f"created KEK version {reply.created.version} (active); "
          "run `medvault keys rewrap` to move existing keys to it")  # fmt: skip
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    """Table of KEK versions: state, wrapped keys, creation time."""
    reply = _stub(ns).ListKeks(kpb.ListKeksRequest(), timeout=TIMEOUT)
    rows = [[f"v{v.version}", v.state, str(v.wrapped_keys), _created(v)] for v in reply.versions]
    print_table(["VERSION", "STATE", "WRAPPED KEYS", "CREATED"], rows)
    return 0


def cmd_rewrap(ns: argparse.Namespace) -> int:
    """Stream rewrap progress into a bar with rate and ETA; Ctrl-C stops it (resumable)."""
    request = kpb.RewrapRequest(from_version=ns.from_version, batch_size=ns.batch)
    stream = _stub(ns).Rewrap(request)
    bar: tqdm[Never] | None = None
    last = kpb.RewrapProgress()
    try:
        for last in stream:
            if bar is None:
                bar = tqdm(total=last.rewrapped + last.remaining, unit="key",
                           desc=f"rewrap to v{last.target_version}",
                           disable=ns.quiet or not sys.stderr.isatty())  # fmt: skip
            bar.total = max(bar.total or 0, last.rewrapped + last.remaining)
            bar.update(last.rewrapped - bar.n)
    except KeyboardInterrupt:
        stream.cancel()
        print("\nstopped; run the same command again to continue", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    print(f"rewrapped {last.rewrapped} keys to KEK v{last.target_version}; "
          f"{last.remaining} left on older versions")  # fmt: skip
    return 0 if last.remaining == 0 else 1


_DESTROY_WARNING = (
    "also destroy the key object in the token: only once no backup within retention "
    "still holds keys wrapped by it (restoring such a backup needs the key)"
)


def cmd_retire(ns: argparse.Namespace) -> int:
    """Retire a KEK version once no wrapped key uses it; destroy its key if asked."""
    request = kpb.RetireKekRequest(version=ns.version, destroy_key=ns.destroy_key)
    try:
        reply = _stub(ns).RetireKek(request, timeout=TIMEOUT)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
            print(f"medvault: not retired: {e.details()}", file=sys.stderr)
            return 1
        raise
    if ns.destroy_key:
        print(f"KEK version {reply.version} is {reply.state}: deleted from the token")
    else:
        print(f"KEK version {reply.version} is {reply.state}: no new keys are wrapped with "
              "it; its key stays on the token for restoring backups (delete it later with "
              "--destroy-key)")  # fmt: skip
    return 0


def _version(text: str) -> int:
    return positive_int(text.removeprefix("v"))


def register_kek(keys: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the KEK commands to the ``medvault keys`` sub-parsers."""
    rotate = keys.add_parser("rotate-kek", help="create the next master-key (KEK) version")
    rotate.set_defaults(func=cmd_rotate)
    listing = keys.add_parser("keks", help="list KEK versions, their state and use")
    listing.set_defaults(func=cmd_list)
    rewrap = keys.add_parser("rewrap", help="move wrapped data keys to the active KEK (resumable)")
    rewrap.add_argument("--batch", type=positive_int, default=200, help="keys per batch")
    rewrap.add_argument("--from-version", type=non_negative_int, default=0,
                        help="only keys on this version (default: every older one)")  # fmt: skip
    rewrap.add_argument("--quiet", action="store_true", help="no progress bar")
    rewrap.set_defaults(func=cmd_rewrap)
    retire = keys.add_parser("retire-kek", help="retire an unused KEK version (no new wraps)")
    retire.add_argument("version", type=_version, help="version number (3 or v3)")
    retire.add_argument("--destroy-key", action="store_true", help=_DESTROY_WARNING)
    retire.set_defaults(func=cmd_retire)
    for parser in (rotate, listing, rewrap, retire):
        add_connection_flags(parser)
