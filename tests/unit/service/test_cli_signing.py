"""``medvault sign`` against an in-process fake SigningService: what it sends and prints."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from service._gen.medvault.v1 import signing_pb2 as pb
from service._gen.medvault.v1 import signing_pb2_grpc as pb_grpc
from service.cli.main import main


class FakeSigning(pb_grpc.SigningServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[pb.SignRecordRequest] = []

    def SignRecord(self, request: Any, context: Any) -> pb.SignatureInfo:  # noqa: N802
        self.requests.append(request)
        pades = request.format == pb.SIGNATURE_FORMAT_PADES
        return pb.SignatureInfo(
            id="ab" * 16, record_id=request.record_id, version=2 if pades else 1,
            signer=request.signer, algorithm="ecdsa-sha256", format=request.format,
        )  # fmt: skip

    def VerifyRecord(self, request: Any, context: Any) -> pb.VerifyRecordResponse:  # noqa: N802
        info = pb.SignatureInfo(id="cd" * 16, signer="dr-lan", algorithm="ecdsa-sha256",
                                format=pb.SIGNATURE_FORMAT_PADES)  # fmt: skip
        result = pb.SignatureVerification(signature=info, valid=True)
        return pb.VerifyRecordResponse(results=[result])


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeSigning]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    signing = FakeSigning()
    pb_grpc.add_SigningServiceServicer_to_server(signing, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", signing
    server.stop(None)


def test_sign_is_cades_by_default_and_pades_on_request(
    fake: tuple[str, FakeSigning], capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint, signing = fake
    common = ["--signer", "dr-lan", "--insecure", "--endpoint", endpoint]
    assert main(["sign", "r1", *common]) == 0
    assert "v1 signed by dr-lan" in capsys.readouterr().out
    assert main(["sign", "r1", "--pades", *common]) == 0
    assert "v2 signed by dr-lan (ecdsa-sha256, PAdES embedded in this new version)" in (
        capsys.readouterr().out
    )
    assert [r.format for r in signing.requests] == [
        pb.SIGNATURE_FORMAT_CADES_DETACHED, pb.SIGNATURE_FORMAT_PADES
    ]


def test_verify_shows_the_format(
    fake: tuple[str, FakeSigning], capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint, _ = fake
    assert main(["verify", "r1", "--insecure", "--endpoint", endpoint]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[5:7] == ["format", "result"]
    assert "PAdES" in out[2]
    assert "valid" in out[2]
