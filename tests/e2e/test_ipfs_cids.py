"""Ferry's streaming CIDs equal the CIDs a real IPFS node gives for the same bytes
(`add` with cid-version 1, raw leaves, 256 KiB chunks), at every size where the DAG's
shape changes: empty, one byte, around one chunk, and past 174 chunks (two link levels)."""

from __future__ import annotations

import hashlib

import pytest

from tests.fixtures.ipfsnode import IpfsNode
from workers.cid import ContentHasher, normalize_cid

pytestmark = pytest.mark.e2e

CHUNK = 262_144
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 10 * 2**20, 175 * CHUNK + 17, 100 * 2**20]


def data_of(size: int) -> bytes:
    block = hashlib.sha256(str(size).encode()).digest() * (2**20 // 32)
    return (block * (size // len(block) + 1))[:size]


def node_cid(node: IpfsNode, data: bytes) -> str:
    r = node.rpc("add", params={"cid-version": "1", "raw-leaves": "true", "chunker": f"size-{CHUNK}",
                                "pin": "false"}, files={"file": ("f", data)}, timeout=300)
    return normalize_cid(r.json()["Hash"])


@pytest.mark.parametrize("size", SIZES)
def test_ferry_cid_equals_the_nodes(ipfs_node, size):
    data = data_of(size)
    hasher = ContentHasher()
    for i in range(0, len(data), 65_536):  # streamed in pieces that do not line up with chunks
        hasher.update(data[i:i + 65_536])
    assert hasher.digest().cid == node_cid(ipfs_node, data)
