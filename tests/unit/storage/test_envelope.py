"""Streaming envelope: interoperability with Tink, fixed vectors, tampering, ranges, chunking."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterable, Iterator

import pytest
from tink import cleartext_keyset_handle, streaming_aead
from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

from storage.envelope import StreamingAead
from storage.errors import IntegrityError

KEY = bytes(range(32))
SALT = bytes(range(0x40, 0x60))
PREFIX = bytes.fromhex("a0a1a2a3a4a5a6")
FIXED = (SALT, PREFIX)


def record_ad(record_id: str, version: int) -> bytes:
    """The associated data the record store binds (docs/encryption.md)."""
    return b"medvault:record:v1:" + record_id.encode() + b":" + version.to_bytes(4, "big")


AD = record_ad("rec-0001", 1)
AD_OTHER = record_ad("rec-0002", 1)


def data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def boundary_sizes(sa: StreamingAead) -> list[int]:
    """Plaintext sizes around the first segment and at exact multiples of segments."""
    f, p = sa.segment_plaintext_size(0), sa.segment_plaintext_size(1)
    return [0, 1, f - 1, f, f + 1, f + p - 1, f + p, f + p + 1, f + 2 * p, f + 3 * p + 7]


# --- Tink --------------------------------------------------------------------------------

streaming_aead.register()


class _Sink(io.BytesIO):
    """Tink closes its destination; keep the bytes readable afterwards."""

    def close(self) -> None:
        pass


def tink_primitive(key: bytes, segment_size: int) -> streaming_aead.StreamingAead:
    params = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
        ciphertext_segment_size=segment_size,
        derived_key_size=32,
        hkdf_hash_type=common_pb2.SHA256,
    )
    key_proto = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(
        version=0, key_value=key, params=params
    )
    keyset = tink_pb2.Keyset(
        primary_key_id=1,
        key=[
            tink_pb2.Keyset.Key(
                key_data=tink_pb2.KeyData(
                    type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                    value=key_proto.SerializeToString(),
                    key_material_type=tink_pb2.KeyData.SYMMETRIC,
                ),
                status=tink_pb2.ENABLED,
                key_id=1,
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    handle = cleartext_keyset_handle.from_keyset(keyset)
    return handle.primitive(streaming_aead.StreamingAead)


def tink_encrypt(prim: streaming_aead.StreamingAead, pieces: Iterable[bytes], ad: bytes) -> bytes:
    sink = _Sink()
    with prim.new_encrypting_stream(sink, ad) as stream:
        for piece in pieces:
            stream.write(piece)
    return sink.getvalue()


def tink_decrypt(prim: streaming_aead.StreamingAead, ciphertext: bytes, ad: bytes) -> bytes:
    with prim.new_decrypting_stream(io.BytesIO(ciphertext), ad) as stream:
        out: bytes = stream.read()
        return out


MIB = 1 << 20
INTEROP_CASES = [
    (size, n) for size in (256, 4096) for n in boundary_sizes(StreamingAead(KEY, size))
] + [(1 << 20, n) for n in (0, 1, MIB - 57, MIB - 56, MIB - 55, 2 * MIB - 72, 2 * MIB - 71)]


@pytest.mark.parametrize(("segment_size", "n"), INTEROP_CASES)
def test_interop_with_tink_both_ways(segment_size: int, n: int) -> None:
    ours, tink = StreamingAead(KEY, segment_size), tink_primitive(KEY, segment_size)
    plaintext = data(n, seed=n)

    from_us = b"".join(ours.encrypt([plaintext], AD))
    assert len(from_us) == ours.ciphertext_size(n)
    assert ours.plaintext_size(len(from_us)) == n
    assert tink_decrypt(tink, from_us, AD) == plaintext

    from_tink = tink_encrypt(tink, [plaintext[:7], plaintext[7:]], AD)
    assert len(from_tink) == len(from_us)
    assert b"".join(ours.decrypt([from_tink], AD)) == plaintext


def test_tink_ciphertext_with_wrong_ad_is_rejected() -> None:
    from_tink = tink_encrypt(tink_primitive(KEY, 256), [data(500)], AD)
    with pytest.raises(IntegrityError):
        b"".join(StreamingAead(KEY, 256).decrypt([from_tink], AD_OTHER))


# --- fixed vectors (generated once by this Tink-verified code; Tink decrypts them) -------

_HEADER_HEX = "28" + SALT.hex() + PREFIX.hex()
VECTORS = [
    (b"", _HEADER_HEX + "9f59b3a14bc873a8554c47a18a806afa"),
    (b"medvault", _HEADER_HEX + "bfeff9c8dc81b49be2349881eb83d3dee9cfb3edb794221d"),
    (
        b"The quick brown fox jumps over the lazy dog. 0123456789",
        _HEADER_HEX
        + "85344eabaeacbc94909e123358cd911fef5c78410cdcca65689d263566b909ec97d8bf0d0135d8262c"
        "915ebac1018df1df3795059ee1fa33aa4ff9dece29a9f502e1c2332ebc46e9b7c599131a72199da8dbf9"
        "0a5db0d3",
    ),
]


@pytest.mark.parametrize(("plaintext", "expected_hex"), VECTORS)
def test_fixed_vectors(plaintext: bytes, expected_hex: str) -> None:
    sa = StreamingAead(KEY, 64)
    ciphertext = b"".join(sa._encrypt([plaintext], AD, _salt_and_prefix=FIXED))
    assert ciphertext.hex() == expected_hex
    assert b"".join(sa.decrypt([ciphertext], AD)) == plaintext
    assert tink_decrypt(tink_primitive(KEY, 64), ciphertext, AD) == plaintext


# --- sizes and parameters ------------------------------------------------------------------


def test_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="key"):
        StreamingAead(bytes(16))
    with pytest.raises(ValueError, match="segment_size"):
        StreamingAead(KEY, 56)
    with pytest.raises(ValueError, match="segment_size"):
        StreamingAead(KEY, (1 << 26) + 1)
    sa = StreamingAead(KEY, 57)
    assert sa.header_size == 40
    assert sa.segment_plaintext_size(0) == 1
    assert StreamingAead(KEY).segment_size == 1 << 20


def test_sizes_round_trip_and_impossible_sizes() -> None:
    sa = StreamingAead(KEY, 256)
    for n in range(2000):
        assert sa.plaintext_size(sa.ciphertext_size(n)) == n
    assert sa.ciphertext_size(0) == 56
    for impossible in (0, 1, 55, 256 + 1, 256 + 15, 512 + 15):
        with pytest.raises(IntegrityError):
            sa.plaintext_size(impossible)
    with pytest.raises(ValueError, match="plaintext_size"):
        sa.ciphertext_size(-1)


# --- tampering -------------------------------------------------------------------------------

SEG = 256
TAMPER_PT = data(200 + 2 * 240 + 100, seed=7)  # segments of 200, 240, 240, 100 plaintext bytes
TAMPER_SA = StreamingAead(KEY, SEG)
TAMPER_CT = b"".join(TAMPER_SA._encrypt([TAMPER_PT], AD, _salt_and_prefix=FIXED))
PT_SEGMENTS = [TAMPER_PT[:200], TAMPER_PT[200:440], TAMPER_PT[440:680], TAMPER_PT[680:]]


def decrypt_until_error(ciphertext: bytes, ad: bytes = AD, chunk: int = 100) -> list[bytes]:
    """Decrypt, expect IntegrityError, return what was yielded before it."""
    out: list[bytes] = []
    pieces = (ciphertext[i : i + chunk] for i in range(0, len(ciphertext), chunk))
    with pytest.raises(IntegrityError) as caught:
        out.extend(TAMPER_SA.decrypt(pieces, ad))
    assert str(caught.value) == "ciphertext failed authentication"
    assert out == PT_SEGMENTS[: len(out)], "only whole, authenticated segments are released"
    return out


def segment_of_byte(position: int) -> int:
    return -1 if position < 40 else position // SEG


def test_untampered_ciphertext_decrypts() -> None:
    assert list(TAMPER_SA.decrypt([TAMPER_CT], AD)) == PT_SEGMENTS


@pytest.mark.parametrize("position", range(len(TAMPER_CT)))
def test_flipped_byte_anywhere(position: int) -> None:
    tampered = bytearray(TAMPER_CT)
    tampered[position] ^= 0x01
    out = decrypt_until_error(bytes(tampered))
    assert len(out) == max(segment_of_byte(position), 0)


@pytest.mark.parametrize("cut", [0, 1, 39, 40, 41, 255, 256, 257, 300, 512, 768, 769, 880])
def test_truncation(cut: int) -> None:
    out = decrypt_until_error(TAMPER_CT[:cut])
    assert len(out) <= max(segment_of_byte(cut), 0)


def test_truncation_of_exact_multiple_at_segment_boundary() -> None:
    plaintext = data(200 + 240, seed=3)  # fills two segments exactly: no empty last segment
    ciphertext = b"".join(TAMPER_SA.encrypt([plaintext], AD))
    assert len(ciphertext) == 2 * SEG
    with pytest.raises(IntegrityError):
        b"".join(TAMPER_SA.decrypt([ciphertext[:SEG]], AD))


@pytest.mark.parametrize(
    "suffix", [b"\x00", TAMPER_CT[256:512], TAMPER_CT[-16:]], ids=["byte", "segment", "tag"]
)
def test_extension(suffix: bytes) -> None:
    out = decrypt_until_error(TAMPER_CT + suffix)
    assert len(out) == 3


def test_extension_after_full_last_segment() -> None:
    ciphertext = b"".join(TAMPER_SA.encrypt([data(440)], AD))
    with pytest.raises(IntegrityError):
        b"".join(TAMPER_SA.decrypt([ciphertext + ciphertext[SEG:]], AD))


def test_swapped_segments() -> None:
    swapped = TAMPER_CT[:256] + TAMPER_CT[512:768] + TAMPER_CT[256:512] + TAMPER_CT[768:]
    assert len(decrypt_until_error(swapped)) == 1


def test_wrong_associated_data_and_moved_records() -> None:
    assert decrypt_until_error(TAMPER_CT, ad=AD[:-1] + b"\x02") == []
    record_b = b"".join(TAMPER_SA.encrypt([TAMPER_PT], AD_OTHER))
    assert decrypt_until_error(record_b, ad=AD) == []
    # A segment lifted from another object under the same key and AD: other salt, other key.
    other = b"".join(TAMPER_SA.encrypt([TAMPER_PT], AD))
    spliced = TAMPER_CT[:512] + other[512:768] + TAMPER_CT[768:]
    assert len(decrypt_until_error(spliced)) == 2


def test_wrong_key() -> None:
    other = StreamingAead(bytes(32), SEG)
    with pytest.raises(IntegrityError):
        b"".join(other.decrypt([TAMPER_CT], AD))


# --- random access ---------------------------------------------------------------------------


class Store:
    """An object store stand-in that records the ranges read."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> Iterator[bytes]:
        self.reads.append((offset, length))
        chunk = self.blob[offset : offset + length]
        return (chunk[i : i + 50] for i in range(0, len(chunk), 50))


RANGE_SA = StreamingAead(KEY, SEG)
RANGE_PT = data(200 + 10 * 240 + 33, seed=11)
RANGE_CT = b"".join(RANGE_SA.encrypt([RANGE_PT], AD))


def read_range(offset: int, length: int, blob: bytes = RANGE_CT) -> tuple[bytes, Store]:
    store = Store(blob)
    out = b"".join(RANGE_SA.decrypt_range(store.read, len(RANGE_CT), AD, offset, length))
    return out, store


def test_range_random_slices() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        offset = rng.randrange(len(RANGE_PT) + 1)
        length = rng.randrange(0, 800)
        out, store = read_range(offset, length)
        assert out == RANGE_PT[offset : offset + length]
        assert len(store.reads) <= 2


def test_range_segment_boundaries() -> None:
    boundaries = [200 + 240 * k for k in range(11)]
    for b in boundaries:
        for offset, length in ((b - 1, 2), (b, 1), (b - 1, 1), (b, 240), (max(b - 240, 0), 240)):
            out, _ = read_range(offset, length)
            assert out == RANGE_PT[offset : offset + length]
    out, store = read_range(0, len(RANGE_PT))
    assert out == RANGE_PT
    assert store.reads == [(0, 40), (40, len(RANGE_CT) - 40)]


def test_range_reads_only_covering_segments() -> None:
    out, store = read_range(440, 240)  # exactly segment 2
    assert out == RANGE_PT[440:680]
    assert store.reads == [(0, 40), (512, 256)]


def test_range_bounds() -> None:
    assert read_range(len(RANGE_PT), 10)[0] == b""
    assert read_range(5, 0)[0] == b""
    with pytest.raises(ValueError, match="offset"):
        read_range(len(RANGE_PT) + 1, 1)
    with pytest.raises(ValueError, match="offset"):
        read_range(-1, 1)
    with pytest.raises(ValueError, match="length"):
        read_range(0, -1)


@pytest.mark.parametrize("position", [0, 5, 39, 512, 600, 767])
def test_range_tamper_inside_requested_segments(position: int) -> None:
    tampered = bytearray(RANGE_CT)
    tampered[position] ^= 0x80
    with pytest.raises(IntegrityError):
        read_range(440, 240, bytes(tampered))


def test_range_tamper_outside_requested_segments_is_not_read() -> None:
    tampered = bytearray(RANGE_CT)
    tampered[1000] ^= 0x80
    assert read_range(440, 240, bytes(tampered))[0] == RANGE_PT[440:680]


def test_range_last_flag_is_checked() -> None:
    # Claiming the object ends at a segment boundary makes a middle segment "last": rejected.
    store = Store(RANGE_CT)
    with pytest.raises(IntegrityError):
        b"".join(RANGE_SA.decrypt_range(store.read, 3 * SEG, AD, 450, 10))


def test_range_short_or_long_read_is_rejected() -> None:
    def short(offset: int, length: int) -> list[bytes]:
        return [RANGE_CT[offset : offset + length - 1]]

    def long(offset: int, length: int) -> list[bytes]:
        return [RANGE_CT[offset : offset + length + 1]]

    for reader in (short, long):
        read: Callable[[int, int], Iterable[bytes]] = reader
        with pytest.raises(IntegrityError):
            b"".join(RANGE_SA.decrypt_range(read, len(RANGE_CT), AD, 300, 300))


# --- chunking --------------------------------------------------------------------------------


def random_chunks(blob: bytes, rng: random.Random, biggest: int) -> list[bytes]:
    chunks, i = [], 0
    while i < len(blob):
        n = rng.choice([0, 1, rng.randrange(1, biggest)])
        chunks.append(blob[i : i + n])
        i += n
    return chunks


def test_ciphertext_independent_of_plaintext_chunking() -> None:
    sa = StreamingAead(KEY, SEG)
    rng = random.Random(99)
    for n in boundary_sizes(sa):
        plaintext = data(n, seed=n)
        expected = b"".join(sa._encrypt([plaintext], AD, _salt_and_prefix=FIXED))
        for biggest in (2, 97, 600):
            chunks = random_chunks(plaintext, rng, biggest)
            assert b"".join(sa._encrypt(chunks, AD, _salt_and_prefix=FIXED)) == expected
            pieces = random_chunks(expected, rng, biggest)
            assert b"".join(sa.decrypt(pieces, AD)) == plaintext


def test_encrypt_yields_header_then_whole_segments() -> None:
    sa = StreamingAead(KEY, SEG)
    parts = list(sa.encrypt([data(1000)], AD))
    assert [len(p) for p in parts] == [40, 216, 256, 256, 256, 96]
    assert list(sa.decrypt(iter(parts), AD)) == [
        data(1000)[a:b] for a, b in ((0, 200), (200, 440), (440, 680), (680, 920), (920, 1000))
    ]
