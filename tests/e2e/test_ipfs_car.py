"""CARv1 against the real IPFS node: a CAR Ferry writes imports (`dag import`) with the
same root and content; a CAR the node exports (`dag export`) parses and verifies in Ferry,
and a corrupted one is refused naming the lying block."""

from __future__ import annotations

import json

import pytest

from ferry.errors import ChecksumMismatch
from tests.e2e.test_ipfs_cids import CHUNK, data_of, node_cid
from workers.car import CarReader, content, write_car
from workers.cid import digest_bytes, normalize_cid

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("size", [0, 1, CHUNK + 1, 175 * CHUNK + 17])
def test_a_car_ferry_writes_imports_into_the_node_with_the_same_root(ipfs_node, size):
    data = data_of(size + 3)  # other bytes than the CID test's, so the node has not seen them
    cid = digest_bytes(data).cid
    car = b"".join(write_car((data[i:i + 100_000] for i in range(0, len(data), 100_000)), cid))
    r = ipfs_node.rpc("dag/import", files={"file": ("o.car", car)}, timeout=300)
    roots = [normalize_cid(json.loads(line)["Root"]["Cid"]["/"]) for line in r.text.splitlines() if line.strip()]
    assert roots == [cid]
    assert ipfs_node.rpc("cat", params={"arg": cid}, timeout=60).content == data


@pytest.mark.parametrize("size", [1, CHUNK + 1, 175 * CHUNK + 17])
def test_a_car_the_node_exports_parses_and_verifies(ipfs_node, size):
    data = data_of(size + 7)
    cid = node_cid(ipfs_node, data)
    car = ipfs_node.rpc("dag/export", params={"arg": cid}, timeout=120).content
    reader = CarReader([car[i:i + 65_536] for i in range(0, len(car), 65_536)])
    assert reader.roots == [cid]
    blocks = {c: (codec, block) for c, codec, block in reader.blocks()}
    assert b"".join(content(cid, blocks.__getitem__)) == data
    bad = bytearray(car)
    bad[-5] ^= 0xFF  # inside the last block
    with pytest.raises(ChecksumMismatch, match="does not hash to its CID"):
        list(CarReader([bytes(bad)]).blocks())


def test_writing_a_car_for_the_wrong_root_fails_at_the_end():
    data = data_of(10)
    other = digest_bytes(b"something else").cid
    with pytest.raises(ChecksumMismatch, match="not of that object"):
        list(write_car([data], other))
