"""workers.cid against reference CIDs from the JS IPFS importer.

The vectors in cid_vectors.json were produced once with ipfs-unixfs-importer@17.1.1
(cross-checked with @15.4.0) using the options of `ipfs add --cid-version 1 --raw-leaves`;
its "_about" and "generator_js" entries say exactly how. Node is not needed to run these
tests.

Depth 3 at Kubo's parameters needs 174*174+1 chunks of 256 KiB (~7.9 GB), too big to
test here. The tree logic is covered instead by vectors with smaller chunks: chunk 4096
with the real 174 links (depth 3 at ~124 MB), and chunk 1024/1000 with 3 or 2 links,
reaching depth 5 and beyond with tiny inputs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.cid import CHUNK, MAX_LINKS, ContentHasher, Digest, digest_bytes

VECTORS = json.loads((Path(__file__).with_name("cid_vectors.json")).read_text())["cases"]
EMPTY_CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"

# The vectors' content: byte i = (i * 31 + 7) % 251, which repeats every 251 bytes.
_PERIOD = bytes((i * 31 + 7) % 251 for i in range(251))
_BLOCK = _PERIOD * (1024 * 1024 // 251)  # ~1 MiB of whole periods, so pieces stay in phase


def pattern_pieces(size: int) -> Iterator[memoryview]:
    """The vector content of `size` bytes as ~1 MiB pieces, without building it whole."""
    view = memoryview(_BLOCK)
    left = size
    while left:
        n = min(left, len(view))
        yield view[:n]
        left -= n


def pattern(size: int) -> bytes:
    return b"".join(pattern_pieces(size))


def hash_pieces(data: bytes, piece: int, **params: int) -> Digest:
    hasher = ContentHasher(**params)
    view = memoryview(data)
    for pos in range(0, len(data), piece):
        hasher.update(view[pos : pos + piece])
    return hasher.digest()


def raw_cid(data: bytes) -> str:
    cid = b"\x01\x55\x12\x20" + hashlib.sha256(data).digest()
    return "b" + base64.b32encode(cid).decode().lower().rstrip("=")


@pytest.mark.parametrize(
    "case", VECTORS, ids=[f"{c['size']}b-chunk{c['chunk_size']}-links{c['max_links']}" for c in VECTORS]
)
def test_reference_vectors(case: dict) -> None:
    hasher = ContentHasher(chunk_size=case["chunk_size"], max_links=case["max_links"])
    for piece in pattern_pieces(case["size"]):
        hasher.update(piece)
    assert hasher.digest() == Digest(case["size"], case["sha256"], case["cid"])


def test_vectors_cover_the_boundaries() -> None:
    # Guard against the vector file losing the cases this module exists to check.
    kubo = {c["size"] for c in VECTORS if (c["chunk_size"], c["max_links"]) == (CHUNK, MAX_LINKS)}
    assert {0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 174 * CHUNK, 174 * CHUNK + 1, 175 * CHUNK + 5} <= kubo
    assert 174 * 174 * 4096 + 1 in {c["size"] for c in VECTORS if c["max_links"] == MAX_LINKS}


def test_defaults_are_kubos() -> None:
    assert (CHUNK, MAX_LINKS) == (262144, 174)


def test_empty() -> None:
    assert digest_bytes(b"") == Digest(0, hashlib.sha256(b"").hexdigest(), EMPTY_CID)
    assert ContentHasher().digest().cid == EMPTY_CID


@pytest.mark.parametrize("size", [1, 2, 1000, CHUNK - 1, CHUNK])
def test_up_to_one_chunk_is_the_raw_cid(size: int) -> None:
    data = random.Random(size).randbytes(size)
    digest = digest_bytes(data)
    assert digest.cid == raw_cid(data)
    assert digest.cid.startswith("bafkrei")


def test_more_than_one_chunk_is_dag_pb() -> None:
    assert digest_bytes(bytes(CHUNK + 1)).cid.startswith("bafybei")


@pytest.mark.parametrize("size", [0, 5, CHUNK, 3 * CHUNK + 17])
def test_sha256_and_size_match_hashlib(size: int) -> None:
    data = random.Random(size).randbytes(size)
    digest = digest_bytes(data)
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.size == size


@pytest.mark.parametrize("piece", [7, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 1 << 20])
def test_piece_sizes_do_not_matter(piece: int) -> None:
    data = random.Random(1).randbytes(2 * CHUNK + 13)
    assert hash_pieces(data, piece) == digest_bytes(data)


def test_one_byte_pieces_match_the_reference() -> None:
    # One-byte updates over a deep small-parameter tree (depth 5 with 3 links per node).
    case = next(c for c in VECTORS if (c["size"], c["chunk_size"], c["max_links"]) == (100000, 1024, 3))
    digest = hash_pieces(pattern(100000), 1, chunk_size=1024, max_links=3)
    assert digest.cid == case["cid"]


def test_irregular_pieces_match_the_reference() -> None:
    case = next(c for c in VECTORS if c["size"] == 5 * 1024 * 1024 + 3)
    data = memoryview(pattern(case["size"]))
    rng = random.Random(7)
    hasher = ContentHasher()
    pos = 0
    while pos < len(data):
        n = rng.choice([0, 1, 7, 4096, CHUNK - 3, CHUNK + 5, 3 * CHUNK])
        hasher.update(data[pos : pos + n])
        pos += n
    assert hasher.digest().cid == case["cid"]


def test_accepts_bytearray_and_memoryview() -> None:
    data = random.Random(2).randbytes(CHUNK + 99)
    hasher = ContentHasher()
    hasher.update(bytearray(data[:10]))
    hasher.update(memoryview(data)[10:])
    assert hasher.digest() == digest_bytes(data)


def test_digest_is_final() -> None:
    hasher = ContentHasher()
    hasher.update(b"abc")
    first = hasher.digest()
    assert hasher.digest() == first
    with pytest.raises(RuntimeError):
        hasher.update(b"more")


@pytest.mark.parametrize("params", [{"chunk_size": 0}, {"max_links": 1}])
def test_rejects_degenerate_parameters(params: dict) -> None:
    with pytest.raises(ValueError):
        ContentHasher(**params)


def test_memory_does_not_grow_with_size() -> None:
    # 64 MiB through one reused buffer, in pieces that leave a partial chunk behind: what
    # stays allocated is that partial chunk and a few link lists, not the content.
    piece = bytes((1 << 20) + 1)
    hasher = ContentHasher()
    tracemalloc.start()
    try:
        for _ in range(64):
            hasher.update(piece)
        hasher.digest()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * CHUNK


def test_normalize_cid_turns_base58btc_into_base32_and_refuses_the_rest():
    from workers.cid import normalize_cid

    b32 = "bafybeie5hltw2wu4xqop2ku4hbk7lrj3qhltti5cx665uxv3nvccjxym4q"
    assert normalize_cid("zdj7Wg1fBYZo7yR8EcoLvrRu7Q2Bwbb7pG47EKTf5234ALJYK") == b32  # js-ipfs's form
    assert normalize_cid(b32) == b32
    for bad in ("QmRaaUwTNfwgFZpeUy8qrZwrp2dY4kCKmmB5xEqvH3vtD1", "z0OIl", "mAXASIA"):
        with pytest.raises(ValueError):
            normalize_cid(bad)


def test_check_cid_accepts_ferrys_cids_in_either_base_and_refuses_everything_else():
    from ferry.errors import InvalidKey
    from workers.cid import check_cid

    b32 = "bafybeie5hltw2wu4xqop2ku4hbk7lrj3qhltti5cx665uxv3nvccjxym4q"
    assert check_cid(b32) == b32
    assert check_cid("zdj7Wg1fBYZo7yR8EcoLvrRu7Q2Bwbb7pG47EKTf5234ALJYK") == b32
    raw = digest_bytes(b"x").cid
    assert raw.startswith("bafkrei") and check_cid(raw) == raw
    cbor = "bafyreigbtj4x7ip5legnfznufuopl4sg4knzc2cof6duas4b3q2fy6swua"  # dag-cbor: not a UnixFS file here
    identity = "bafkqaaa"  # identity multihash of nothing
    for bad in ("", "a/b", "../x", "QmRaaUwTNfwgFZpeUy8qrZwrp2dY4kCKmmB5xEqvH3vtD1", b32[:-1], b32 + "a",
                b32.upper(), cbor, identity, "b" + "!" * 58, b32 + "\x00"):
        with pytest.raises(InvalidKey):
            check_cid(bad)
