"""The storage backend contract, run against every driver.

Each contract test takes the `backend` fixture, parametrized over the drivers: "local"
on a temporary directory, "s3" on a fresh bucket of a moto server on loopback (see
tests/fixtures/s3peer.py), "ipfs" on the real IPFS node (tests/fixtures/ipfsnode.py) and
"gateway", read-only, through a trustless-gateway front over that node
(tests/fixtures/gateway.py): its objects are put on the node, and read through the gateway.
"filecoin", read-only, reads through the simulated providers' trustless retrieval (its
objects are put in active deals of tests/fixtures/filecoin_sim.py by `DealMaker`);
"huggingface" runs on a fresh dataset repo of a local stand-in for the Hugging Face Hub that
speaks the Hub's HTTP API (tests/fixtures/hubpeer.py; huggingface.co cannot be reached here).
"storacha" is read the same way (uploads ended with the service, see docs/storacha.md),
through a front sending CARs with every duplicate (dups=y), as Storacha's freeway does.
The S3 backend is given a 5 MiB multipart threshold and part size, S3's minimum, so the
larger cases go through multipart upload. Backends are built through workers.registry
from a BackendSpec, as workers build them.

On a content-addressed backend (IPFS) an object's key is its CID: `key_of` names test
objects by their bytes there, and the cases about chosen names (overwrite, listing by
path) have content-addressed counterparts instead.

Tests of one driver only (symlinks, S3 error mapping, settings) come after the contract.
"""

from __future__ import annotations

import gc
import os
import random
import socket
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

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
from workers import registry
from workers.base import Backend, ObjectStat
from workers.cid import ContentHasher, digest_bytes

MiB = 1024 * 1024
S3_PREFIX = "ferry/"


def build(driver: str, **settings) -> Backend:
    return registry.build(BackendSpec(name=f"test-{driver}", driver=driver, settings=settings))


def s3_settings(endpoint: str, bucket: str, **extra) -> dict:
    return {
        "bucket": bucket,
        "endpoint_url": endpoint,
        "prefix": S3_PREFIX,
        # Resolved by the registry from the environment the s3_server fixture sets.
        "access_key_id": {"env": "AWS_ACCESS_KEY_ID"},
        "secret_access_key": {"env": "AWS_SECRET_ACCESS_KEY"},
        "multipart_threshold": 5 * MiB,
        "part_size": 5 * MiB,
        **extra,
    }


@pytest.fixture(params=["local", "s3", "ipfs", "gateway", "storacha", "huggingface", "filecoin"])
def backend(request, tmp_path) -> Iterator[Backend]:
    # Peers are looked up here so local-only runs never start the S3 server or IPFS node.
    if request.param == "local":
        yield build("local", root=str(tmp_path / "root"))
    elif request.param == "s3":
        yield build("s3", **s3_settings(request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")))
    elif request.param == "huggingface":
        peer = request.getfixturevalue("hub_peer")
        request.getfixturevalue("monkeypatch").setenv(HF_TOKEN_ENV, peer.token)
        repo_id = peer.new_repo()
        backend = build("huggingface", **hub_settings(peer, repo_id))
        backend.peer = peer  # where raw_contents looks behind the driver
        yield backend
        peer.delete_repo("dataset", repo_id)
    elif request.param == "filecoin":
        sim = request.getfixturevalue("fil")  # the Singularity + Lotus + providers simulation
        backend = build("filecoin", **filecoin_settings(sim, tmp_path))
        backend.node = DealMaker(sim, tmp_path / "cars")  # `put` stores in an active deal
        backend.locate = lambda cid: [sim.retrieval_url(DealMaker.PROVIDER)]
        yield backend
    else:
        node = request.getfixturevalue("ipfs_node")
        ipfs = build("ipfs", api_url=node.api_url, timeout=10)
        ipfs.pins_before = set(pins(ipfs))
        if request.param == "ipfs":
            yield ipfs
        else:  # "gateway", or "storacha" through a front with freeway's CAR flavour
            storacha = request.param == "storacha"
            front = request.getfixturevalue("gateway_front")(dups=storacha)
            backend = build(request.param, gateways=[front.url], timeout=5)
            backend.node = ipfs  # where `put` stores what the gateway then serves
            yield backend
        for cid in set(pins(ipfs)) - ipfs.pins_before:  # the node is shared by the session
            ipfs.delete(cid)


HF_TOKEN_ENV = "FERRY_TEST_HF_TOKEN"


def hub_settings(peer, repo_id: str, **extra) -> dict:
    """Settings of a huggingface backend on the Hub peer; the token is a reference to
    HF_TOKEN_ENV, which the test sets to peer.token (or not)."""
    return {"repo_id": repo_id, "endpoint": peer.url, "token": {"env": HF_TOKEN_ENV}, "timeout": 10, **extra}


def filecoin_settings(sim, tmp_path: Path, **extra) -> dict:
    return {"lotus_url": sim.lotus_url, "singularity_url": sim.singularity_url, "client": "f01234",
            "piece_dir": str(tmp_path / "pieces"), "piece_url": "http://127.0.0.1:9", "timeout": 5, **extra}


class DealMaker:
    """Puts an object in an active deal with the simulated provider: its CAR, made by
    Ferry's writer, handed to the sim as a deal it stores and serves by trustless retrieval."""

    PROVIDER = "f01000"

    def __init__(self, sim, folder: Path):
        self.sim, self.folder, self.stored = sim, folder, []
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, key: str, chunks, size: int | None = None) -> int:
        from workers.car import write_car

        path = self.folder / f"{key}.car"
        n = 0

        def counted():
            nonlocal n
            for chunk in chunks:
                n += len(chunk)
                yield chunk

        with open(path, "wb") as f:
            for part in write_car(counted(), key):
                f.write(part)
        self.sim.store(self.PROVIDER, path, verified=False, duration=5000)
        self.stored.append(key)
        return n


def put(backend: Backend, key: str, chunks, size: int | None = None) -> int:
    """Store an object: through the backend, or for a read-only one on the node behind it."""
    if backend.read_only:
        return backend.node.write(key, chunks, size)
    return backend.write(key, chunks, size=size)


def writable(backend: Backend) -> None:
    if backend.read_only:
        pytest.skip("read-only: see test_read_only_backend_refuses_writes")


def pins(backend: Backend) -> list[str]:
    return [s.key for s in backend.list()]


def key_of(backend: Backend, name: str, data: bytes) -> str:
    """The key test data is stored under: its name, or its CID where keys are CIDs."""
    return digest_bytes(data).cid if backend.content_addressed else name


# -- helpers reaching behind a backend, to see what it really left in storage ----------


def raw_contents(backend: Backend) -> list[str]:
    """Everything in the backend's storage, objects or not: every file under a local
    root (temporary files included), every object in the bucket (outside the prefix
    too) and every unfinished multipart upload."""
    if backend.driver == "local":
        root = Path(backend.root)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    if backend.driver == "ipfs":  # what is pinned (unpinned blocks are the node's to collect)
        return sorted(set(pins(backend)) - backend.pins_before)
    if backend.driver in ("gateway", "storacha"):  # it stores nothing; what was put is on the node
        return raw_contents(backend.node)
    if backend.driver == "filecoin":  # what is in active deals with the simulated provider
        return sorted(backend.node.stored)
    if backend.driver == "huggingface":  # every file of the branch, and LFS uploads no commit took
        # The Hub's own .gitattributes, made with the repo, is left out: no key can name it.
        c = backend.config
        return [p for p in backend.peer.raw_contents(c.repo_type, c.repo_id, c.revision) if p != ".gitattributes"]
    client, bucket = backend.client, backend.config.bucket
    found = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", ())]
    found += [f"upload:{u['Key']}" for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", ())]
    return sorted(found)


def plant_write_in_progress(backend: Backend, key: str) -> None:
    """What a write of `key` that is still running leaves behind."""
    if backend.driver == "local":
        path = Path(backend.root, *key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / ".ferry-tmp-abcd1234").write_bytes(b"half")
    elif backend.driver == "huggingface":  # its LFS object uploaded, the commit not yet made
        from huggingface_hub import CommitOperationAdd

        c = backend.config
        backend.api.preupload_lfs_files(c.repo_id, [CommitOperationAdd(c.prefix + key, b"\x00half")],
                                        repo_type=c.repo_type, revision=c.revision)
    else:
        backend.client.create_multipart_upload(Bucket=backend.config.bucket, Key=S3_PREFIX + key)


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def chunked(data: bytes, chunk: int = 777_777) -> Iterator[bytes]:
    # An odd chunk size, so chunk and part boundaries never line up.
    for start in range(0, len(data), chunk):
        yield data[start:start + chunk]


def read_all(backend: Backend, key: str, chunk_size: int = 256 * 1024) -> bytes:
    chunks = list(backend.read(key, chunk_size))
    assert all(type(c) is bytes and 0 < len(c) <= chunk_size for c in chunks)
    return b"".join(chunks)


def keys(stats: Iterator[ObjectStat]) -> list[str]:
    return [s.key for s in stats]


# -- the contract ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, MiB + 1, 12 * MiB], ids=["empty", "1B", "1MiB+1", "12MiB"])
@pytest.mark.parametrize("announce", [True, False], ids=["sized", "unsized"])
def test_round_trip(backend, size, announce):
    data = payload(size)
    key = key_of(backend, "dir/obj.bin", data)
    written = put(backend, key, chunked(data), size=size if announce else None)
    assert written == size
    assert read_all(backend, key) == data
    stat = backend.stat(key)
    assert (stat.key, stat.size) == (key, size)
    if not backend.content_addressed:  # an IPFS object has no time of its own
        assert stat.mtime is not None and abs(stat.mtime - time.time()) < 3600
    if backend.driver == "s3":  # S3 marks a multipart object's ETag with its part count
        assert stat.etag is not None and stat.etag.endswith("-3") == (size == 12 * MiB)
    assert raw_contents(backend) == [("ferry/" if backend.driver == "s3" else "") + key]


def test_overwrite_replaces(backend):
    if backend.content_addressed:
        pytest.skip("a CID names one content: see test_content_addressed_write_checks_the_cid")
    backend.write("k", [b"old"], size=3)
    big = payload(6 * MiB)
    backend.write("k", chunked(big))  # small to multipart-sized
    assert read_all(backend, "k") == big
    backend.write("k", [b"new", b"er"], size=5)  # and back
    assert read_all(backend, "k") == b"newer"
    assert backend.stat("k").size == 5
    assert keys(backend.list()) == ["k"]


def test_missing_keys(backend):
    if backend.content_addressed:
        absent = digest_bytes(b"never stored " + os.urandom(8)).cid
        started = time.monotonic()
        with pytest.raises(KeyNotFound):
            backend.stat(absent)
        with pytest.raises(KeyNotFound):
            backend.read(absent)
        if not backend.read_only:
            assert backend.delete(absent) is False
        assert time.monotonic() - started < 5  # answered, not searched for until a timeout
        return
    with pytest.raises(KeyNotFound):
        backend.stat("nope")
    with pytest.raises(KeyNotFound):
        backend.read("nope")  # at the call, before any next()
    assert backend.delete("nope") is False
    # A prefix of other keys is not itself an object, nor is a path through an object.
    backend.write("d/x", [b"x"])
    for key in ("d", "d/x/y"):
        with pytest.raises(KeyNotFound):
            backend.stat(key)
        with pytest.raises(KeyNotFound):
            backend.read(key)
        assert backend.delete(key) is False
    assert read_all(backend, "d/x") == b"x"


def test_delete(backend):
    writable(backend)
    gone, kept = key_of(backend, "a/b/c", b"data"), key_of(backend, "a/keep", b"kept")
    backend.write(gone, [b"data"])
    backend.write(kept, [b"kept"])
    assert backend.delete(gone) is True
    assert backend.delete(gone) is False
    with pytest.raises(KeyNotFound):
        backend.stat(gone)
    assert [k for k in keys(backend.list()) if k in (gone, kept)] == [kept]
    # The key can be written again where it was.
    again = b"again" if not backend.content_addressed else b"data"
    backend.write(gone, [again])
    assert read_all(backend, gone) == again


LIST_KEYS = ["a-b", "a.txt", "a/b.txt", "a/b/x", "a/bc/d", "a/c", "a0", "ab", "b/z", "z", "ü/1"]


def test_list(backend):
    if backend.content_addressed:
        pytest.skip("keys are CIDs: see test_content_addressed_list")
    for i, key in enumerate(reversed(LIST_KEYS)):
        backend.write(key, [b"x" * i])
    plant_write_in_progress(backend, "a/pending")
    plant_write_in_progress(backend, "a/b.tmp")
    if backend.driver == "s3":  # outside the configured prefix: not this backend's
        backend.client.put_object(Bucket=backend.config.bucket, Key="a/outside", Body=b"")

    listed = list(backend.list())
    assert [s.key for s in listed] == sorted(LIST_KEYS)
    sizes = {key: i for i, key in enumerate(reversed(LIST_KEYS))}
    assert all(s.size == sizes[s.key] for s in listed)
    # A prefix is a plain string prefix, as on S3, not a directory.
    assert keys(backend.list("a/b")) == ["a/b.txt", "a/b/x", "a/bc/d"]
    assert keys(backend.list("a/b/")) == ["a/b/x"]
    assert keys(backend.list("a/")) == ["a/b.txt", "a/b/x", "a/bc/d", "a/c"]
    assert keys(backend.list("a")) == [k for k in sorted(LIST_KEYS) if k.startswith("a")]
    assert keys(backend.list("a/b.txt")) == ["a/b.txt"]
    assert keys(backend.list("ü")) == ["ü/1"]
    assert keys(backend.list("nothing")) == []
    assert keys(backend.list("nothing/")) == []
    assert keys(backend.list("a/c/")) == []  # "a/c" is an object, not a directory


BAD_KEYS = ["", "../x", "a/../../x", "..", "/abs", "/", "a//b", "a/", "./a", "a/./b", "a\\b", "..\\x", "a\x00b"]
BAD_PREFIXES = ["..", "../", "../x", "/abs", "/", "a//b", "a//", "./", "a/../b", "a\\b"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_invalid_keys_refused_by_every_verb(backend, key):
    consumed = []

    def source():
        consumed.append(True)
        yield b"x"

    for verb in (backend.stat, backend.read, backend.delete):
        with pytest.raises(InvalidKey):
            verb(key)
    with pytest.raises(InvalidKey):
        backend.write(key, source())
    with pytest.raises(InvalidKey):
        backend.write(key, source(), size=1)
    assert consumed == []
    assert raw_contents(backend) == []


@pytest.mark.parametrize("prefix", BAD_PREFIXES, ids=repr)
def test_invalid_prefixes_refused(backend, prefix):
    with pytest.raises(InvalidKey):
        backend.list(prefix)  # at the call, before any next()


class SourceBroke(Exception):
    pass


@pytest.mark.parametrize("size", [MiB, 12 * MiB], ids=["single", "multipart"])
@pytest.mark.parametrize("announce", [True, False], ids=["sized", "unsized"])
def test_failed_write_leaves_nothing(backend, size, announce):
    writable(backend)
    old = b"the old object"
    kept = key_of(backend, "kept", old)
    backend.write(kept, [old])
    new = key_of(backend, "new", payload(size))

    def breaks_midway():
        data = payload(size)
        yield from chunked(data[: size * 3 // 4])  # past the first part when multipart
        raise SourceBroke("upstream read failed")

    for key in (new, kept):
        # The caller's own error comes through as it is, not as a backend error.
        with pytest.raises(SourceBroke):
            backend.write(key, breaks_midway(), size=size if announce else None)
    with pytest.raises(KeyNotFound):
        backend.stat(new)
    assert read_all(backend, kept) == old  # an overwrite that fails keeps the old object
    assert raw_contents(backend) == [("ferry/" if backend.driver == "s3" else "") + kept]


@pytest.mark.parametrize(("announced", "actual"), [(10, 5), (5, 10), (12 * MiB, 11 * MiB), (6 * MiB, 7 * MiB)])
def test_wrong_announced_size_is_refused(backend, announced, actual):
    writable(backend)
    data = payload(actual)
    with pytest.raises(BackendError, match="announced"):
        backend.write(key_of(backend, "k", data), chunked(data), size=announced)
    assert raw_contents(backend) == []


def test_write_streams_in_bounded_memory(backend):
    size = 64 * MiB

    def source():
        for _ in range(size // MiB):
            yield bytes(MiB)  # a new object each time: keeping them would show

    writable(backend)
    backend.check()  # builds the S3 client first: its service model alone is ~10 MiB
    key = "big"
    if backend.content_addressed:
        hasher = ContentHasher()
        for chunk in source():
            hasher.update(chunk)
        key = hasher.digest().cid
    tracemalloc.start()
    try:
        written = backend.write(key, source())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written == size
    # S3 holds one 5 MiB part (plus the chunk filling it); local disk about one chunk; the
    # Hub driver spools to disk: a chunk, the library's 1 MiB hashing reads and the (in-process)
    # Hub peer's 1 MiB receive buffer.
    limit = {"local": 4 * MiB, "s3": 10 * MiB, "ipfs": 4 * MiB, "huggingface": 5 * MiB}[backend.driver]
    assert peak < limit, f"peak {peak / MiB:.1f} MiB while writing 64 MiB"
    assert backend.stat(key).size == size


def test_read_closes_early_and_when_dropped(backend):
    data = payload(3 * MiB)
    key = key_of(backend, "k", data)
    put(backend, key, [data])
    chunks = backend.read(key, MiB)
    first = next(chunks)  # at most a chunk (a gateway yields block by block)
    assert 0 < len(first) <= MiB and data.startswith(first)
    chunks.close()
    assert list(chunks) == []
    # Dropped unread: the file or connection is released without a ResourceWarning
    # (which filterwarnings=error would turn into a failure).
    unread = backend.read(key)
    del unread
    gc.collect()
    assert read_all(backend, key) == data


def test_check_passes(backend):
    backend.check()


# -- content-addressed backends: the key is the CID of the bytes -------------------------


@pytest.fixture
def ca_backend(backend) -> Backend:
    if not backend.content_addressed:
        pytest.skip("named keys: see test_overwrite_replaces and test_list")
    return backend


def test_content_addressed_write_checks_the_cid(ca_backend):
    backend = ca_backend
    writable(backend)
    data, other = payload(MiB + 5), payload(MiB + 6)
    key = digest_bytes(data).cid
    with pytest.raises(ChecksumMismatch, match=key):
        backend.write(key, chunked(other))  # bytes that make another CID
    assert raw_contents(backend) == []  # nothing pinned, not even the other bytes' CID
    assert backend.write(key, chunked(data)) == len(data)
    assert backend.write(key, chunked(data)) == len(data)  # the same again: no change
    assert raw_contents(backend) == [key]
    # The base58btc form (what js-ipfs prints) names the same object, answered in base32.
    assert backend.stat(base58btc(key)) == backend.stat(key)
    with pytest.raises(InvalidKey, match="CIDv0"):
        backend.stat("QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn")


def base58btc(cid: str) -> str:
    from workers.car import cid_bytes
    from workers.cid import _BASE58

    n, out = int.from_bytes(cid_bytes(cid), "big"), ""
    while n:
        n, digit = divmod(n, 58)
        out = _BASE58[digit] + out
    return "z" + out


def test_content_addressed_list(ca_backend):
    backend = ca_backend
    stored = {digest_bytes(payload(n)).cid: n for n in (0, 1, 300_000, 2 * MiB)}
    for cid, n in stored.items():
        put(backend, cid, chunked(payload(n)))
    if backend.read_only:  # a gateway cannot list: it answers for the CIDs it is asked
        assert [(s.key, s.size) for s in backend.list(cid)] == [(cid, n)]
        with pytest.raises(BackendError, match="cannot list"):
            backend.list("")
        return
    listed = [s for s in backend.list() if s.key in stored]
    assert [s.key for s in listed] == sorted(stored)
    assert all(s.size == stored[s.key] for s in listed)
    one = sorted(stored)[-1]
    assert [s.key for s in backend.list(one)] == [one]
    assert [s.key for s in backend.list(one[:12]) if s.key in stored] == [k for k in sorted(stored)
                                                                           if k.startswith(one[:12])]
    assert keys(backend.list("bafkzzzz")) == []


# -- local driver ---------------------------------------------------------------------


def test_local_root_is_created(tmp_path):
    root = tmp_path / "deep" / "root"
    backend = build("local", root=str(root))
    assert root.is_dir()
    backend.check()


def test_local_check_refuses_a_file_as_root(tmp_path):
    root = tmp_path / "file"
    root.write_bytes(b"")
    backend = build("local", root=str(root))  # building does not fail: check() reports
    with pytest.raises(BackendUnavailable, match="not a directory"):
        backend.check()


def test_local_vanished_root_is_not_recreated(tmp_path):
    root = tmp_path / "mnt"
    backend = build("local", root=str(root))
    root.rmdir()  # as when a disk is unmounted
    with pytest.raises(BackendUnavailable):
        backend.check()
    with pytest.raises(BackendUnavailable):
        backend.write("a/b", [b"x"])
    assert not root.exists()


def test_local_symlinks_out_of_root_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root = tmp_path / "root"
    backend = build("local", root=str(root))
    (root / "dir-link").symlink_to(outside)
    (root / "file-link").symlink_to(outside / "secret")
    for key in ("dir-link/secret", "file-link", "dir-link/new"):
        for verb in (backend.stat, backend.read, backend.delete):
            with pytest.raises(InvalidKey):
                verb(key)
        with pytest.raises(InvalidKey):
            backend.write(key, [b"x"])
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"
    assert keys(backend.list()) == []  # symlinks are not followed
    assert keys(backend.list("dir-link/")) == []


def test_local_symlinks_inside_root_work(tmp_path):
    root = tmp_path / "root"
    backend = build("local", root=str(root))
    backend.write("real/obj", [b"data"])
    (root / "alias").symlink_to(root / "real")
    assert read_all(backend, "alias/obj") == b"data"


def test_local_temp_names_are_reserved(tmp_path):
    backend = build("local", root=str(tmp_path))
    for key in (".ferry-tmp-x", "a/.ferry-tmp-x/b"):
        with pytest.raises(InvalidKey, match="reserved"):
            backend.write(key, [b"x"])


def test_local_delete_prunes_empty_directories(tmp_path):
    root = tmp_path / "root"
    backend = build("local", root=str(root))
    backend.write("a/b/c/d", [b"x"])
    backend.write("a/e", [b"x"])
    backend.delete("a/b/c/d")
    assert sorted(p.name for p in root.iterdir()) == ["a"]
    assert sorted(p.name for p in (root / "a").iterdir()) == ["e"]
    backend.delete("a/e")
    assert list(root.iterdir()) == []
    assert root.is_dir()


def test_local_key_cannot_be_object_and_directory(tmp_path):
    # Unlike S3, a file system cannot hold both "a" and "a/b": the second write fails
    # cleanly and the first object is untouched.
    backend = build("local", root=str(tmp_path))
    backend.write("a", [b"file"])
    with pytest.raises(BackendError):
        backend.write("a/b", [b"x"])
    backend.write("d/x", [b"x"])
    with pytest.raises(BackendError):
        backend.write("d", [b"x"])
    assert keys(backend.list()) == ["a", "d/x"]
    assert read_all(backend, "a") == b"file"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x"]  # no temp file left


def test_local_fsync(tmp_path):
    backend = build("local", root=str(tmp_path), fsync=True)
    assert backend.write("a/b", [b"durable"]) == 7
    assert read_all(backend, "a/b") == b"durable"


def test_local_too_long_name_is_an_invalid_key(tmp_path):
    backend = build("local", root=str(tmp_path))
    with pytest.raises(InvalidKey):
        backend.write("x" * 300, [b"x"])


# -- S3 driver ------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def dummy_credentials(monkeypatch) -> dict:
    monkeypatch.setenv("FERRY_TEST_KEY_ID", "key-id")
    monkeypatch.setenv("FERRY_TEST_SECRET", "hunter2")
    return {"access_key_id": {"env": "FERRY_TEST_KEY_ID"}, "secret_access_key": {"env": "FERRY_TEST_SECRET"}}


def test_s3_unreachable_endpoint_is_unavailable(dummy_credentials):
    backend = build("s3", bucket="b", endpoint_url=f"http://127.0.0.1:{closed_port()}",
                    connect_timeout=0.5, read_timeout=0.5, max_attempts=1, **dummy_credentials)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        backend.check()
    with pytest.raises(BackendUnavailable):
        backend.stat("k")
    with pytest.raises(BackendUnavailable):
        backend.write("k", [b"x"])
    assert time.monotonic() - started < 10


def test_s3_missing_bucket_is_unavailable(s3_server):
    backend = build("s3", **s3_settings(s3_server, "ferry-no-such-bucket"))
    with pytest.raises(BackendUnavailable, match="does not exist"):
        backend.check()
    with pytest.raises(BackendUnavailable, match="NoSuchBucket"):
        backend.write("k", [b"x"])


def test_s3_create_bucket(s3_server):
    from tests.fixtures.s3peer import s3_client

    name = f"ferry-created-{os.getpid()}-{time.monotonic_ns()}"
    backend = build("s3", **s3_settings(s3_server, name, create_bucket=True))
    backend.check()
    backend.write("k", [b"x"])
    assert read_all(backend, "k") == b"x"
    client = s3_client(s3_server)
    client.delete_object(Bucket=name, Key=S3_PREFIX + "k")
    client.delete_bucket(Bucket=name)


def test_s3_error_mapping():
    from botocore.exceptions import ClientError

    backend = build("s3", bucket="b")

    def error(code: str, status: int):
        return backend._error(
            ClientError({"Error": {"Code": code, "Message": "msg"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                        "PutObject"),
            "write 'k'",
        )

    assert type(error("NoSuchKey", 404)) is KeyNotFound
    assert type(error("404", 404)) is KeyNotFound
    denied = error("AccessDenied", 403)
    assert type(denied) is BackendError and "AccessDenied" in denied.message
    assert type(error("SlowDown", 503)) is BackendUnavailable
    assert type(error("InternalError", 500)) is BackendUnavailable
    assert type(error("NoSuchBucket", 404)) is BackendUnavailable


@pytest.mark.parametrize(
    "settings",
    [
        {"bucket": "b", "part_size": MiB},  # below S3's 5 MiB
        {"bucket": "b", "prefix": "/abs"},
        {"bucket": "b", "prefix": "a/../b"},
        {"bucket": "b", "access_key_id": {"env": "FERRY_TEST_KEY_ID"}},  # without its secret
        {"bucket": "b", "unknown": 1},
        {"endpoint_url": "http://x"},  # no bucket
    ],
)
def test_s3_settings_are_validated(settings, dummy_credentials):
    with pytest.raises(ConfigError):
        build("s3", **settings)


def test_s3_prefix_is_normalized():
    assert build("s3", bucket="b", prefix="a/b").config.prefix == "a/b/"
    assert build("s3", bucket="b", prefix="a/b/").config.prefix == "a/b/"
    assert build("s3", bucket="b").config.prefix == ""


def test_s3_secret_is_not_shown(dummy_credentials):
    backend = build("s3", bucket="b", **dummy_credentials)
    assert backend.config.secret_access_key.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(backend.config)


def test_read_only_backend_refuses_writes(backend):
    if not backend.read_only:
        pytest.skip("writable")
    data = payload(1000)
    key = digest_bytes(data).cid
    put(backend, key, [data])
    consumed = []

    def source():
        consumed.append(True)
        yield data

    for call in (lambda: backend.write(key, source()), lambda: backend.add(source()), lambda: backend.delete(key)):
        with pytest.raises(ReadOnlyBackend):
            call()
    assert consumed == []
    assert read_all(backend, key) == data  # nothing changed
