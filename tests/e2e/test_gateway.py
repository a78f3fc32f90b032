"""The "gateway" driver against trustless gateways whose every byte comes from the real IPFS
node (tests/fixtures/gateway.py), honest and faulty: exact bytes at every DAG shape,
failover before and after bytes were yielded, the error each kind of failure ends in,
and memory that does not grow with the object."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import socket
import tracemalloc

import pytest

from ferry.errors import (
    BackendError,
    BackendUnavailable,
    ChecksumMismatch,
    ConfigError,
    InvalidKey,
    KeyNotFound,
    ReadOnlyBackend,
)
from ferry.settings import BackendSpec
from tests.e2e.test_ipfs_cids import node_cid
from tests.fixtures.gateway import GatewayFront
from workers import registry
from workers.car import MalformedDag, header
from workers.cid import (
    _cid_string,
    _Node,
    _parent,
    _raw_leaf,
    _varint,
    digest_bytes,
    normalize_cid,
)
from workers.gateway import GatewayBackend

pytestmark = pytest.mark.e2e

CHUNK = 262_144
MiB = 1024 * 1024


def gateway(*fronts: GatewayFront | str, **settings) -> GatewayBackend:
    urls = [f if isinstance(f, str) else f.url for f in fronts]
    spec = BackendSpec(name="gw", driver="gateway", settings={"gateways": urls, "timeout": 5, **settings})
    backend = registry.build(spec)
    assert isinstance(backend, GatewayBackend)
    return backend


def read_until_error(backend: GatewayBackend, cid: str) -> tuple[bytes, Exception | None]:
    """What a consumer got before the read failed, and the error."""
    got = bytearray()
    try:
        for chunk in backend.read(cid):
            got += chunk
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return bytes(got), exc
    return bytes(got), None


@pytest.fixture(scope="module")
def file5(ipfs_node) -> tuple[str, bytes]:
    """Five chunks and a bit: a root over six raw leaves."""
    data = os.urandom(5 * CHUNK + 99)
    return node_cid(ipfs_node, data), data


@pytest.fixture(scope="module")
def file40(ipfs_node) -> tuple[str, bytes]:
    data = os.urandom(40 * CHUNK)
    return node_cid(ipfs_node, data), data


# -- honest gateways ------------------------------------------------------------------

@pytest.mark.parametrize("size,mode", [
    (0, "car"), (1, "car"), (CHUNK, "car"), (CHUNK + 1, "car"), (175 * CHUNK + 17, "car"),
    # Per block, as after a failover: the same walk, so two levels of links are enough.
    (0, "raw"), (1, "raw"), (CHUNK + 1, "raw"), (3 * CHUNK + 5, "raw"),
])
def test_round_trip(ipfs_node, gateway_front, size, mode):
    data = os.urandom(size)
    cid = node_cid(ipfs_node, data)
    front = gateway_front()
    backend = gateway(front, mode=mode)
    chunks = list(backend.read(cid, chunk_size=100_000))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= 100_000 for c in chunks)
    assert set(front.formats()) == {mode}
    assert backend.stat(cid).size == size


@pytest.mark.parametrize("mode,dups,chunks", [("car", False, 350), ("raw", False, 350), ("car", True, 20)])
def test_a_file_of_zeros_repeats_blocks(ipfs_node, gateway_front, mode, dups, chunks):
    """350 chunks of zeros: one leaf block 350 times, one full parent twice. The node's
    export sends each once (dups=n); the walk serves repeats from its recent blocks. A
    dups=y gateway sends every repeat, and the walk takes each from the stream."""
    data = bytes(chunks * CHUNK)
    cid = node_cid(ipfs_node, data)
    front = gateway_front(dups=dups)
    got = hashlib.sha256()
    for chunk in gateway(front, mode=mode).read(cid):
        got.update(chunk)
    assert got.digest() == hashlib.sha256(data).digest()
    # Every repeat came from the cache or the stream: no block was asked for twice.
    assert front.formats() == (["car"] if mode == "car" else ["raw"] * 4)


def test_a_repeat_too_far_back_for_the_cache_is_fetched_as_a_raw_block(ipfs_node, gateway_front):
    """Leaf A, five other leaves, A again: the node's export sends A once, and by the
    time the walk needs it again it has left the recent blocks, so it is asked for raw."""
    a, others = os.urandom(CHUNK), [os.urandom(CHUNK) for _ in range(5)]
    data = a + b"".join(others) + a
    cid = node_cid(ipfs_node, data)
    front = gateway_front()
    assert b"".join(gateway(front).read(cid)) == data
    assert front.formats() == ["car", "raw"]


def test_stat_list_and_the_read_only_verbs(ipfs_node, gateway_front, file5):
    cid, data = file5
    backend = gateway(gateway_front())
    assert backend.stat(cid).size == len(data)
    assert backend.stat(cid).mtime is None
    assert [(s.key, s.size) for s in backend.list(cid)] == [(cid, len(data))]
    for prefix in ("", "x/", "bafy", cid + "/"):
        with pytest.raises(BackendError, match="cannot list"):
            backend.list(prefix)
    with pytest.raises(InvalidKey):
        backend.list("../")

    def chunks():
        raise AssertionError("a read-only backend consumed the chunks")
        yield b""

    with pytest.raises(ReadOnlyBackend):
        backend.write(cid, chunks())
    with pytest.raises(ReadOnlyBackend):
        backend.delete(cid)
    with pytest.raises(InvalidKey):
        backend.write("not/a/cid", chunks())
    with pytest.raises(InvalidKey):
        backend.delete("Qmfoo")
    with pytest.raises(InvalidKey):
        backend.read("../etc/passwd")
    assert backend.capacity() is None
    assert GatewayBackend.content_addressed and GatewayBackend.read_only


def test_settings_are_checked():
    for settings in ({"gateways": []}, {"gateways": ["ftp://host"]}, {"gateways": ["http://h?x=1"]},
                     {"gateways": ["http://h", "http://h/"]}, {"gateways": ["http://h"], "bogus": 1},
                     {"gateways": ["http://h"], "mode": "bitswap"}):
        with pytest.raises(ConfigError):
            registry.build(BackendSpec(name="gw", driver="gateway", settings=settings))
    backend = gateway("http://h/prefix/")
    assert backend.config.gateways == ["http://h/prefix"]


def test_check_passes_when_one_gateway_answers_the_probe(ipfs_node, gateway_front):
    good, down, wrong = gateway_front(), gateway_front("down"), gateway_front("wrong-type")
    gateway(down, good).check()
    with pytest.raises(BackendUnavailable) as err:
        gateway(down, wrong, ipfs_node.gateway_url).check()
    assert down.url in str(err.value) and "not a trustless gateway" in str(err.value)


# -- failover -------------------------------------------------------------------------

def test_a_corrupt_block_before_any_byte_fails_over_to_the_next_car(gateway_front, file5, caplog):
    cid, data = file5
    bad, good = gateway_front("corrupt", at=1), gateway_front()
    with caplog.at_level(logging.WARNING, logger="workers.gateway"):
        assert b"".join(gateway(bad, good).read(cid)) == data
    assert good.formats() == ["car"]
    assert any(bad.url in r.getMessage() and "does not hash" in r.getMessage() for r in caplog.records)


def test_a_corrupt_late_block_fails_over_mid_stream_block_by_block(gateway_front, file40, caplog):
    """Block 30 of the first gateway's CAR is corrupt, after 29 leaves were yielded: the
    same walk goes on with raw blocks from the second, from leaf 30 on, once each."""
    cid, data = file40
    bad, good = gateway_front("corrupt", at=30), gateway_front()
    got = bytearray()
    with caplog.at_level(logging.WARNING, logger="workers.gateway"):
        for chunk in gateway(bad, good).read(cid, chunk_size=CHUNK):
            assert data[len(got):len(got) + len(chunk)] == chunk  # nothing wrong is ever yielded
            got += chunk
    assert got == data
    assert bad.formats() == ["car"]
    assert good.formats() == ["raw"] * 11  # leaves 30..40, none twice, no second CAR
    assert any(bad.url in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode,at", [("missing", 3), ("missing", 0), ("truncate", 0), ("truncate", 4),
                                     ("down", 1), ("wrong-type", 1)])
def test_a_failing_gateway_is_passed_over(gateway_front, file5, mode, at):
    cid, data = file5
    first, good = gateway_front(mode, at=at), gateway_front()
    assert b"".join(gateway(first, good).read(cid)) == data
    assert gateway(first, good).stat(cid).size == len(data)


def test_a_gateway_that_never_answers_times_out_and_is_passed_over(gateway_front, file5):
    """A listening socket nobody accepts from: the connection opens, no answer comes."""
    cid, data = file5
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert b"".join(gateway(url, gateway_front(), timeout=0.5).read(cid)) == data
        with pytest.raises(BackendUnavailable, match="timed out"):
            gateway(url, timeout=0.5).read(cid)


def test_the_nodes_own_gateway_is_not_trustless_and_is_passed_over(ipfs_node, gateway_front, file5):
    cid, data = file5
    assert b"".join(gateway(ipfs_node.gateway_url, gateway_front()).read(cid)) == data


def test_all_gateways_corrupt_is_a_checksum_mismatch_and_nothing_wrong_is_yielded(gateway_front, file5):
    cid, data = file5
    got, err = read_until_error(gateway(gateway_front("corrupt", at=1), gateway_front("corrupt", at=1)), cid)
    assert isinstance(err, ChecksumMismatch) and got == b""
    assert "does not hash" in str(err)

    got, err = read_until_error(gateway(gateway_front("corrupt", at=4), gateway_front("corrupt", at=4)), cid)
    assert isinstance(err, ChecksumMismatch)
    assert got == data[:3 * CHUNK]  # the three good leaves, then the error

    with pytest.raises(ChecksumMismatch):
        gateway(gateway_front("corrupt", at=0), gateway_front("missing")).stat(cid)


def test_gateways_that_lack_a_block_mid_file_are_unavailable(gateway_front, file5):
    cid, data = file5
    got, err = read_until_error(gateway(gateway_front("missing", at=3), gateway_front("missing")), cid)
    assert isinstance(err, BackendUnavailable) and not isinstance(err, KeyNotFound)
    assert got == data[:2 * CHUNK]


def test_an_unknown_cid_is_key_not_found_at_the_call(gateway_front):
    cid = digest_bytes(os.urandom(64)).cid  # never added to the node
    first, second = gateway_front(), gateway_front()
    backend = gateway(first, second)
    with pytest.raises(KeyNotFound) as err:
        backend.read(cid)
    assert first.url in str(err.value) and second.url in str(err.value)
    with pytest.raises(KeyNotFound):
        gateway(first).stat(cid)
    # One gateway could not be asked: "absent" would not be honest.
    with pytest.raises(BackendUnavailable):
        gateway(first, gateway_front("down")).read(cid)


def test_no_trustless_gateway_at_all_is_a_backend_error(ipfs_node, gateway_front, file5):
    with pytest.raises(BackendError, match="not a trustless gateway") as err:
        gateway(gateway_front("wrong-type"), ipfs_node.gateway_url).read(file5[0])
    assert not isinstance(err.value, (KeyNotFound, BackendUnavailable, ChecksumMismatch))


# -- the DAG's shape -----------------------------------------------------------------

def test_a_directory_is_not_a_file(ipfs_node, gateway_front):
    r = ipfs_node.rpc("add", params={"cid-version": "1", "raw-leaves": "true", "wrap-with-directory": "true",
                                     "pin": "false"}, files={"file": ("f", os.urandom(100))})
    directory = [json.loads(line) for line in r.text.splitlines()][-1]["Hash"]
    with pytest.raises(MalformedDag, match="Directory"):
        gateway(gateway_front()).read(normalize_cid(directory))


def test_blocksizes_that_lie_about_a_leaf_are_refused(ipfs_node, gateway_front):
    """A DAG whose parent says its second leaf holds one byte more than it does, imported
    into the node: every block hashes right, but the file is not what the root says."""
    a, b = os.urandom(CHUNK), os.urandom(1000)
    leaf_a, leaf_b = _raw_leaf(a), _raw_leaf(b)
    root, block = _parent([leaf_a, _Node(leaf_b.cid, leaf_b.tsize, leaf_b.filesize + 1)])
    car = header(root.cid) + b"".join(_varint(len(c) + len(x)) + c + x
                                      for c, x in ((root.cid, block), (leaf_a.cid, a), (leaf_b.cid, b)))
    ipfs_node.rpc("dag/import", files={"file": ("x.car", car)})
    got, err = read_until_error(gateway(gateway_front()), _cid_string(root.cid))
    assert isinstance(err, MalformedDag) and "parent says 1001" in str(err)
    assert got == a  # the first leaf was right, and the lie is caught before the second


# -- resources ------------------------------------------------------------------------

def test_closing_or_dropping_a_read_early_releases_its_streams(gateway_front, file40):
    cid, data = file40
    backend = gateway(gateway_front())
    reader = backend.read(cid)
    assert next(reader) == data[:CHUNK]
    reader.close()
    assert list(reader) == []
    reader = backend.read(cid)
    next(reader)
    del reader
    gc.collect()  # filterwarnings=error: an unclosed socket would fail the test


def test_memory_stays_bounded_reading_64_mib(ipfs_node, gateway_front):
    data = os.urandom(64 * MiB)
    cid = node_cid(ipfs_node, data)
    want = hashlib.sha256(data).digest()
    del data
    front = gateway_front()
    backend = gateway(front)
    got = hashlib.sha256()
    tracemalloc.start()
    try:
        for chunk in backend.read(cid):
            got.update(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.digest() == want
    assert front.formats() == ["car"]
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"
