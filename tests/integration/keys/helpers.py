"""Clients and checks shared by the key-lifecycle tests (no patient data in messages)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc

from service._gen.medvault.v1 import keys_pb2 as kpb
from service._gen.medvault.v1 import keys_pb2_grpc as kpb_grpc
from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from tests.fixtures.service import RunningService
from tests.fixtures.softhsm import SoftHsmToken
from tests.integration.service.calls import fetch, put

TIMEOUT = 60
AUTHORITY = "urn:oid:2.999.42.9"


def patient() -> pb.PatientId:
    return pb.PatientId(id=f"K{uuid.uuid4().hex}", assigning_authority=AUTHORITY)


def keys_stub(service: RunningService, cert: tuple[Path, Path]) -> kpb_grpc.KeyServiceStub:
    return kpb_grpc.KeyServiceStub(service.channel(*cert))


def records_stub(service: RunningService) -> pb_grpc.RecordServiceStub:
    return pb_grpc.RecordServiceStub(service.channel())


def versions(stub: kpb_grpc.KeyServiceStub) -> dict[int, kpb.KekVersion]:
    reply = stub.ListKeks(kpb.ListKeksRequest(), timeout=TIMEOUT)
    return {v.version: v for v in reply.versions}


def rewrap_all(stub: kpb_grpc.KeyServiceStub, batch: int = 200) -> list[kpb.RewrapProgress]:
    return list(stub.Rewrap(kpb.RewrapRequest(batch_size=batch), timeout=600))


def write(stub: pb_grpc.RecordServiceStub, who: pb.PatientId, size: int) -> tuple[str, bytes]:
    """Store ``size`` random bytes; the record id and the SHA-256 of what was sent."""
    content = os.urandom(size)
    record = put(stub, who, content)
    return record.id, hashlib.sha256(content).digest()


def read_digest(stub: pb_grpc.RecordServiceStub, record_id: str) -> bytes | grpc.StatusCode:
    """SHA-256 of the record as read, or the status code it failed with."""
    fetched = fetch(stub, record_id)
    if fetched.error is not None:
        return fetched.error.code()
    return hashlib.sha256(fetched.content).digest()


_LIST_SCRIPT = """
import sys
from keystore import Pkcs11Config, Pkcs11SessionPool
from keystore.pkcs11_keys import list_kek_versions
config = Pkcs11Config(module_path=sys.argv[1], token_label=sys.argv[2], pin_env=None,
                      pin_file=sys.argv[3])
with Pkcs11SessionPool(config) as pool, pool.session() as s:
    print(" ".join(str(v) for v in list_kek_versions(s, config.kek_label_prefix)))
"""


def token_kek_versions(token: SoftHsmToken, label: str) -> list[int]:
    """KEK versions on token ``label``, read by a child process (its own module load)."""
    env = {**os.environ, "SOFTHSM2_CONF": str(token.conf_path)}
    out = subprocess.run(
        [sys.executable, "-c", _LIST_SCRIPT, token.module_path, label, str(token.pin_file)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [int(v) for v in out.stdout.split()]
