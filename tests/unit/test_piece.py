"""Packing objects into pieces: CARs of whole UnixFS DAGs, CommP computed while written."""

from __future__ import annotations

import os
import random

import pytest

from ferry.errors import ChecksumMismatch
from workers.car import CarReader, content
from workers.cid import digest_bytes
from workers.commp import piece_of_bytes
from workers.piece import Entry, PieceWriter, capacity, car_bound, plan

KiB, MiB = 1024, 1024 * 1024


def _blobs(sizes: list[int]) -> list[bytes]:
    rng = random.Random(7)
    return [rng.randbytes(n) for n in sizes]


def _chunks(data: bytes, n: int = 100_000):
    for i in range(0, len(data), n):
        yield data[i:i + n]


@pytest.mark.parametrize("size", [0, 1, 262143, 262144, 262145, 3 * MiB, 174 * 262144 + 1])
def test_car_bound_is_an_upper_bound(tmp_path, size):
    data = _blobs([size])[0]
    cid = digest_bytes(data).cid
    with PieceWriter(tmp_path / "p.car", [cid], fsync=False) as w:
        w.add(cid, _chunks(data))
        w.finish()
    car = (tmp_path / "p.car").read_bytes()
    assert len(car) <= car_bound(size) + 41 + 32  # the object's blocks + a one-root header
    # and not absurdly loose: within 1 % + 200 bytes of the real size
    assert car_bound(size) <= len(car) * 1.01 + 200


def test_a_piece_holds_every_object_by_its_cid_and_its_commp_is_of_the_car(tmp_path):
    blobs = _blobs([0, 70, 262144, 600 * KiB, 2 * MiB + 3])
    cids = [digest_bytes(b).cid for b in blobs]
    path = tmp_path / "piece.car"
    with PieceWriter(path, cids) as w:
        for cid, data in zip(cids, blobs, strict=True):
            assert w.add(cid, _chunks(data)) == len(data)
        piece = w.finish()
    car = path.read_bytes()
    assert piece == piece_of_bytes(car)  # CommP of exactly the bytes a provider fetches
    assert piece.payload_size == len(car)
    assert piece.cid.startswith("baga6ea4seaq")
    reader = CarReader(_chunks(car))
    blocks = {cid: (codec, block) for cid, codec, block in reader.blocks()}  # each hash checked
    assert reader.roots == cids
    for cid, data in zip(cids, blobs, strict=True):
        assert b"".join(content(cid, blocks.__getitem__)) == data
    assert not list(tmp_path.glob(".*.part"))


def test_a_source_that_lies_aborts_the_piece_and_leaves_nothing(tmp_path):
    good, bad = _blobs([1000, 2000])
    cids = [digest_bytes(good).cid, digest_bytes(bad).cid]
    path = tmp_path / "piece.car"
    with pytest.raises(ChecksumMismatch, match="make CID"):
        with PieceWriter(path, cids) as w:
            w.add(cids[0], [good])
            w.add(cids[1], [bad[:-1] + b"X"])
    assert list(tmp_path.iterdir()) == []


def test_objects_must_come_in_header_order(tmp_path):
    a, b = _blobs([10, 20])
    ca, cb = digest_bytes(a).cid, digest_bytes(b).cid
    w = PieceWriter(tmp_path / "p.car", [ca, cb], fsync=False)
    with pytest.raises(ValueError, match="order"):
        w.add(cb, [b])
    w.abort()
    w = PieceWriter(tmp_path / "p.car", [ca, cb], fsync=False)
    w.add(ca, [a])
    with pytest.raises(ValueError, match="not added"):
        w.finish()
    w.abort()


def test_plan_fills_pieces_to_the_target_and_never_over(tmp_path):
    target = 4 * MiB
    sizes = [700 * KiB, 1 * MiB, 900 * KiB, 5, 1500 * KiB, 3 * MiB, 8 * MiB, 100 * KiB]
    blobs = _blobs(sizes)
    entries = [Entry(digest_bytes(b).cid, len(b), ref=i) for i, b in enumerate(blobs)]
    groups, too_big = plan(entries, target)
    assert [e.ref for e in too_big] == [6]  # 8 MiB cannot fit a 4 MiB piece
    assert sorted(e.ref for g in groups for e in g) == [0, 1, 2, 3, 4, 5, 7]
    assert len(groups) == 3
    for n, group in enumerate(groups):
        path = tmp_path / f"{n}.car"
        with PieceWriter(path, [e.cid for e in group], fsync=False) as w:
            for e in group:
                w.add(e.cid, _chunks(blobs[e.ref]))
            piece = w.finish()
        assert piece.padded_size <= target
        assert os.path.getsize(path) <= capacity(target)


def test_capacity_is_fr32():
    assert capacity(2**35) == 2**35 // 128 * 127
    with pytest.raises(Exception, match="power of two"):
        capacity(3000)


def test_packing_memory_stays_flat(tmp_path):
    """An 8 MiB object streamed into a piece: the CAR and its CommP are made with a few
    chunks of memory, whatever the size (here well under 3 MiB of Python heap)."""
    import tracemalloc

    size, chunk = 8 * MiB, 256 * KiB
    block = random.Random(3).randbytes(chunk)

    def chunks():
        for _ in range(size // chunk):
            yield block

    from workers.cid import ContentHasher

    hasher = ContentHasher()
    for c in chunks():
        hasher.update(c)
    cid = hasher.digest().cid
    tracemalloc.start()
    try:
        with PieceWriter(tmp_path / "big.car", [cid], fsync=False) as w:
            assert w.add(cid, chunks()) == size
            piece = w.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * MiB, peak
    assert piece.payload_size == os.path.getsize(tmp_path / "big.car") > size
    assert piece.padded_size == 16 * MiB
