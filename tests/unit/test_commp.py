"""PieceHasher against published CommP vectors, plus streaming, size and memory properties.

Every expected value below is copied from the public source named above it; none is
computed here. The go-fil-commp-hashhash "random.txt" and web3-storage/data-segment
"test/commp/vector.csv" vectors are not used: their payloads come from Go's math/rand and
from files named only by their CID, neither reproducible here without reimplementing them.
"""

from __future__ import annotations

import base64
import random
import tracemalloc

import pytest

from workers.commp import (
    PieceHasher,
    PieceTooSmall,
    padded_piece_size,
    piece_of_bytes,
    zero_commitment,
)

# filecoin-project/go-fil-commp-hashhash, testdata/zero.txt (payload of 0x00 bytes):
# payload size, padded piece size, v1 piece CID.
ZERO_VECTORS = """\
96,128,baga6ea4seaqdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy
126,128,baga6ea4seaqdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy
127,128,baga6ea4seaqdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy
192,256,baga6ea4seaqgiktap34inmaex4wbs6cghlq5i2j2yd2bb2zndn5ep7ralzphkdy
253,256,baga6ea4seaqgiktap34inmaex4wbs6cghlq5i2j2yd2bb2zndn5ep7ralzphkdy
254,256,baga6ea4seaqgiktap34inmaex4wbs6cghlq5i2j2yd2bb2zndn5ep7ralzphkdy
255,512,baga6ea4seaqfpirydiugkk7up5v666wkm6n6jlw6lby2wxht5mwaqekerdfykjq
256,512,baga6ea4seaqfpirydiugkk7up5v666wkm6n6jlw6lby2wxht5mwaqekerdfykjq
384,512,baga6ea4seaqfpirydiugkk7up5v666wkm6n6jlw6lby2wxht5mwaqekerdfykjq
507,512,baga6ea4seaqfpirydiugkk7up5v666wkm6n6jlw6lby2wxht5mwaqekerdfykjq
508,512,baga6ea4seaqfpirydiugkk7up5v666wkm6n6jlw6lby2wxht5mwaqekerdfykjq
509,1024,baga6ea4seaqb66wjlfkrbye6uqoemcyxmqylwmrm235uclwfpsyx3ge2imidoly
512,1024,baga6ea4seaqb66wjlfkrbye6uqoemcyxmqylwmrm235uclwfpsyx3ge2imidoly
768,1024,baga6ea4seaqb66wjlfkrbye6uqoemcyxmqylwmrm235uclwfpsyx3ge2imidoly
1015,1024,baga6ea4seaqb66wjlfkrbye6uqoemcyxmqylwmrm235uclwfpsyx3ge2imidoly
1016,1024,baga6ea4seaqb66wjlfkrbye6uqoemcyxmqylwmrm235uclwfpsyx3ge2imidoly
1017,2048,baga6ea4seaqpy7usqklokfx2vxuynmupslkeutzexe2uqurdg5vhtebhxqmpqmy
1024,2048,baga6ea4seaqpy7usqklokfx2vxuynmupslkeutzexe2uqurdg5vhtebhxqmpqmy
"""

# filecoin-project/go-fil-commp-hashhash, testdata/0xCC.txt (payload of 0xCC bytes).
CC_VECTORS = """\
96,128,baga6ea4seaqhwcjhi4krhl3ht6dewnwevkpxbepxy7p7onwgz65t52typbsysby
126,128,baga6ea4seaqapbh46gdnszvb7fcinevsy5bzg3b4higkh7groptswf6zas6jamy
127,128,baga6ea4seaqmfldjtozgne6adk7eve2vdxte7vzlivae7nzsbrawobo546zkijq
192,256,baga6ea4seaqkx7m2s6r4zahtlbwrs5ryvemkclwfp7nijopdd5swpdnxzjf7wkq
253,256,baga6ea4seaql6ldbyafhiecr36xba5tufreyo4km2ts3lfknhl2zogp3aztxijy
254,256,baga6ea4seaqkixbzz75uys2pcjbrbdilgjhmum72qm4xphrwav2iyel5oat4aka
255,512,baga6ea4seaqg7celu5y2iwbi2ra5koygvotxtzr5lj6vzvxi6gfub6mpa6niwpi
256,512,baga6ea4seaqi7c3dnwkqysqh4lpkz5jaxz2d2f5bvo3ttu2hnfmdewhcoji56na
384,512,baga6ea4seaqhexlmnzbarsbdbdahs7e36dkq5vkdwsrttehoakrif5wiqme36lq
507,512,baga6ea4seaqenvh5mcy5cjqwsbubbpczprkk2onwvfjd2743zkqh6ofuzkatwey
508,512,baga6ea4seaqb6ckbupixkhwp7thgb52f4en222boppajkqk7gaomkpof3lh4cei
509,1024,baga6ea4seaqdzbeaexq6gpbqh2tlnbz5mm5neap2kejsketkogzd6x2dx7dzkii
512,1024,baga6ea4seaqojaa522sjqms2wipasjbxnjgytunsgp52tgrfcofj73f7q7ou6hy
768,1024,baga6ea4seaqb6xvxaybzp6vslujjiwvgt23ckrwt7y53eddy5qmc6csnc37lwpi
1015,1024,baga6ea4seaqmgiyjcutwgo6glks2mogixs6mb4sbehto6uzienucfx23wbtkica
1016,1024,baga6ea4seaqjxgfdkdu37aryhg7bqqiwizj5f6ugasftgeocabwnj4cxkgisaoq
1017,2048,baga6ea4seaqf3n5ob5qonkwnxfcbjzftsagbnrjfzualqvzhcylz46b7sgz6wmi
1024,2048,baga6ea4seaqdlpnhgsndrgjeu4p46hahlsr4lybg6du4d56ooppdpxhcofxeuoi
"""


def _vectors(fill: int, table: str) -> list[tuple[int, int, int, str]]:
    rows = (line.split(",") for line in table.splitlines())
    return [(fill, int(size), int(padded), cid) for size, padded, cid in rows]


HASHHASH_VECTORS = _vectors(0x00, ZERO_VECTORS) + _vectors(0xCC, CC_VECTORS)

# filecoin-project/go-fil-commcid, commcid_test.go, TestMultihashes: v2 piece CIDs that
# go-fil-commp-hashhash + DataCommitmentV1ToPieceMhCID give for 127 bytes each of
# 0x00, 0x01, 0x02, 0x03, then the listed number of zero bytes.
_0123 = b"".join(bytes([b]) * 127 for b in range(4))
V2_VECTORS = [
    (_0123, "bafkzcibcaaces3nobte6ezpp4wqan2age2s5yxcatzotcvobhgcmv5wi2xh5mbi"),
    (_0123 + bytes(127 * 4), "bafkzcibcaac542av3szurbbscwuu3zjssvfwbpsvbjf6y3tukvlgl2nf5rha6pa"),
    (_0123 + bytes(4), "bafkzcibd7abqlxticxolgseegik2stpfgkkuwyf6kufex3doorkvmzpjuxwe4dz4"),
    (_0123 + bytes(5), "bafkzcibd64bqlxticxolgseegik2stpfgkkuwyf6kufex3doorkvmzpjuxwe4dz4"),
]


def _stream(data: bytes, sizes: list[int]) -> PieceHasher:
    hasher = PieceHasher()
    pos, i = 0, 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        hasher.update(data[pos : pos + step])
        pos += step
        i += 1
    return hasher


@pytest.mark.parametrize(("fill", "size", "padded", "cid"), HASHHASH_VECTORS)
def test_go_fil_commp_hashhash_vectors(fill: int, size: int, padded: int, cid: str) -> None:
    data = bytes([fill]) * size
    piece = piece_of_bytes(data)
    assert (piece.cid, piece.padded_size, piece.payload_size) == (cid, padded, size)
    # The reference reads in 127, 25 %, 254, ... pieces; odd sizes straddle every boundary.
    assert _stream(data, [1, 126, 3, 254, 31]).digest() == piece


@pytest.mark.parametrize(("data", "cid_v2"), V2_VECTORS)
def test_go_fil_commcid_v2_vectors(data: bytes, cid_v2: str) -> None:
    assert piece_of_bytes(data).cid_v2 == cid_v2
    assert _stream(data, [7, 200]).digest().cid_v2 == cid_v2


def test_zero_commitments() -> None:
    # web3-storage/data-segment (storacha/data-segment), test/zero-comm.spec.js.
    assert zero_commitment(0) == bytes(32)
    assert zero_commitment(15) == bytes(
        [217, 152, 135, 185, 115, 87, 58, 150, 225, 19, 147, 100, 82, 54, 193, 123,
         31, 76, 112, 52, 215, 35, 199, 169, 159, 112, 155, 180, 218, 97, 22, 43]
    )  # fmt: skip
    assert zero_commitment(63) == bytes(
        [187, 148, 98, 169, 238, 22, 200, 173, 52, 49, 93, 189, 207, 49, 75, 243,
         186, 212, 164, 65, 237, 16, 19, 210, 111, 175, 249, 192, 160, 242, 63, 25]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "height"),
    # filecoin-project/go-fil-commcid, commcid_test.go, TestTreeHeight (sizes >= 127):
    # tree height = log2(padded piece size) - 5.
    [(127 * 4, 4), (512, 5), (127, 2), ((32 << 30) * 127 // 128, 30), ((64 << 30) * 127 // 128, 31)],
)
def test_padded_size_matches_commcid_tree_height(payload: int, height: int) -> None:
    assert padded_piece_size(payload) == 32 << height


def test_padded_size_rules() -> None:
    assert padded_piece_size(65) == 128
    for padded in (128, 256, 1 << 20, 32 << 30):
        unpadded = padded // 128 * 127
        assert padded_piece_size(unpadded) == padded
        assert padded_piece_size(unpadded + 1) == 2 * padded


def test_small_inputs() -> None:
    # go-fil-commp-hashhash refuses fewer than MinPiecePayload = 65 bytes; so do we.
    hasher = PieceHasher()
    hasher.update(bytes(64))
    with pytest.raises(PieceTooSmall):
        hasher.digest()
    hasher.update(b"\0")
    piece = hasher.digest()
    # Same tree as 127 zero bytes (zero-filled quantum), but no v2 CID under 127 bytes.
    assert piece.cid == piece_of_bytes(bytes(127)).cid
    assert piece.cid_v2 is None
    assert piece_of_bytes(bytes(127)).cid_v2 is not None


def test_v1_cid_encoding() -> None:
    piece = piece_of_bytes(bytes([0xCC]) * 1024)
    assert piece.cid.startswith("baga6ea4seaq")
    body = piece.cid[1:].upper()
    raw = base64.b32decode(body + "=" * (-len(body) % 8))
    # CIDv1, codec 0xf101 (varint 81 e2 03), multihash 0x1012 (varint 92 20), length 32.
    assert raw[:7] == bytes.fromhex("0181e203922020")
    assert raw[7:].hex() == piece.commitment
    assert len(raw) == 39


def test_v2_cid_embeds_v1_commitment() -> None:
    data, cid_v2 = V2_VECTORS[2]
    body = cid_v2[1:].upper()
    raw = base64.b32decode(body + "=" * (-len(body) % 8))
    # CIDv1, raw (0x55), multihash 0x1011 (varint 91 20), then the digest's length.
    assert raw[:4] == bytes.fromhex("01559120")
    assert raw[-32:].hex() == piece_of_bytes(data).commitment


def test_streaming_any_chunking_equals_one_shot() -> None:
    rng = random.Random(20240611)
    for size in (65, 127, 128, 1000, 4064, 4065, 33_000, 130_049):
        data = rng.randbytes(size)
        expected = piece_of_bytes(data)
        for _ in range(3):
            sizes = [rng.randint(1, 700) for _ in range(5)]
            assert _stream(data, sizes).digest() == expected, (size, sizes)


def test_digest_does_not_end_the_stream_and_reset_does() -> None:
    data = random.Random(7).randbytes(5000)
    hasher = PieceHasher()
    hasher.update(data[:3000])
    assert hasher.digest() == piece_of_bytes(data[:3000])
    hasher.update(data[3000:])
    assert hasher.digest() == piece_of_bytes(data)
    hasher.reset()
    hasher.update(data[:100])
    assert hasher.digest() == piece_of_bytes(data[:100])


def _peak_while_hashing(total: int, chunk: bytes) -> int:
    hasher = PieceHasher()
    tracemalloc.start()
    try:
        for _ in range(total // len(chunk)):
            hasher.update(chunk)
        hasher.digest()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat() -> None:
    # 1 MiB chunks (not multiples of 127, so a carry crosses every boundary); the chunk
    # is allocated before tracing, so the peak is the hasher's own working set.
    chunk = random.Random(3).randbytes(1 << 20)
    small = _peak_while_hashing(1 << 20, chunk)
    large = _peak_while_hashing(8 << 20, chunk)
    assert large < 64 * 1024
    assert large < small + 8 * 1024  # 8x the data, a few more tree levels at most
