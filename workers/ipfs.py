"""The "ipfs" driver: objects pinned on an IPFS node, through the Kubo RPC API (/api/v0).

IPFS is content-addressed, so the key of an object here is its CID (CIDv1, base32), the
one Ferry computes while the bytes stream (workers.cid): a copy to IPFS is named by what
its bytes are, never by the source's key, and an object migrated from S3 keeps its CID.

Pins are the replica. `write` adds the bytes unpinned (`add` with cid-version=1,
raw-leaves and the size-262144 chunker, the DAG layout workers.cid computes), compares
the CID the node made with the one expected and only then pins it: bytes that make
another CID fail loudly (ChecksumMismatch) and leave nothing pinned (the node's GC frees
their blocks). `stat`, `read`, `list` and `delete` see pinned objects only: a pin that
disappeared is a missing replica even while its blocks still linger in the blockstore.

Settings:
  api_url     the node's RPC API, e.g. http://127.0.0.1:5001 (Kubo's default)
  timeout     seconds per request; also passed to the node as `timeout=`, so a CID it
              does not hold fails instead of hanging while it searches the network
  auth        an Authorization header value (Kubo's API.Authorizations:
              "Basic dXNlcjpwYXNz" or "Bearer <secret>"), e.g. {"env": "IPFS_API_AUTH"}

Why not ipfshttpclient: 0.7.0 refuses every daemon newer than 0.8 (VersionMismatch);
0.8.0a2, its last release (2021, unmaintained), warns on every connect to a current
daemon and emits a urllib3 FutureWarning on every request, and it cannot stream an add
from an iterator. The verbs Ferry needs are a handful of POSTs, so this module speaks
them over httpx (already a dependency) with typed errors and per-call timeouts.

Tested against js-ipfs 0.18.1 (tests/fixtures/ipfsnode.py), which serves the same RPC
API; where it differs from Kubo (CIDv1 printed in base58btc) answers are normalised.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import httpx
from pydantic import Field, SecretStr

from ferry.errors import (
    BackendError,
    BackendUnavailable,
    ChecksumMismatch,
    FerryError,
    InvalidKey,
    KeyNotFound,
)
from workers.base import CHUNK_SIZE, Backend, Capacity, DriverConfig, ObjectStat
from workers.cid import CHUNK, check_cid, normalize_cid

log = logging.getLogger(__name__)

# What makes the node's DAG the one workers.cid computes.
ADD_PARAMS = {"cid-version": "1", "raw-leaves": "true", "chunker": f"size-{CHUNK}", "hash": "sha2-256",
              "progress": "false", "pin": "false"}
_BASE32 = set("abcdefghijklmnopqrstuvwxyz234567")
_NO_LIMIT = 2**53 - 1  # js-ipfs reports Number.MAX_SAFE_INTEGER when StorageMax is unset


class IpfsConfig(DriverConfig):
    api_url: str = "http://127.0.0.1:5001"
    timeout: float = Field(default=60.0, gt=0)
    auth: SecretStr | None = None


def _cid_prefix(prefix: str) -> str:
    """A list prefix is the start of a base32 CID: letters a-z and digits 2-7."""
    if not set(prefix) <= _BASE32:
        raise InvalidKey(f"{prefix!r} cannot start a CID (base32: a-z, 2-7); keys on IPFS are CIDs",
                         field="prefix")
    return prefix


class _Body:
    """The chunks of a streaming response, closed when exhausted, closed or dropped unread;
    with a `size`, exactly that many bytes must arrive (a cat cut short is an error, not
    an object)."""

    def __init__(self, response: httpx.Response, chunk_size: int, size: int | None, what: str):
        self._response = response
        self._chunks = response.iter_bytes(chunk_size)
        self._left = size
        self._what = what

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._response is None:
            raise StopIteration
        try:
            chunk = next(self._chunks, b"")
        except httpx.HTTPError as exc:
            self.close()
            raise BackendUnavailable(f"{self._what}: read failed: {exc}") from exc
        if self._left is None:
            if not chunk:
                self.close()
                raise StopIteration
            return chunk
        self._left -= len(chunk)
        if not chunk or self._left < 0:
            self.close()
            if self._left != 0:
                raise BackendError(f"{self._what}: the node's stream ended "
                                   f"{'early' if self._left > 0 else 'late'} ({self._left:+d} B)")
            raise StopIteration
        return chunk

    def close(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.close()

    def __del__(self) -> None:
        self.close()


class IpfsBackend(Backend):
    driver = "ipfs"
    Config = IpfsConfig
    content_addressed: ClassVar[bool] = True

    def __init__(self, name: str, config: IpfsConfig):
        super().__init__(name, config)
        headers = {"Authorization": config.auth.get_secret_value()} if config.auth else {}
        self._pid = os.getpid()
        self._make_client = lambda: httpx.Client(
            base_url=config.api_url.rstrip("/") + "/api/v0", headers=headers,
            timeout=httpx.Timeout(config.timeout + 5, connect=min(config.timeout, 10)))
        self._client = self._make_client()

    def __del__(self) -> None:
        client = self.__dict__.get("_client")
        if client is not None:
            client.close()

    # -- the RPC calls ---------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        if os.getpid() != self._pid:  # forked (a prefork Celery worker): a pool of our own
            self._pid, self._client = os.getpid(), self._make_client()
        return self._client

    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        return {**params, "timeout": f"{self.config.timeout:g}s"}

    def _fail(self, exc: Exception, doing: str) -> FerryError:
        if isinstance(exc, httpx.TransportError):
            return BackendUnavailable(f"{self.name}: {doing}: {self.config.api_url} unreachable: {exc!r}")
        return BackendError(f"{self.name}: {doing}: {exc}")

    def _error(self, response: httpx.Response, doing: str) -> FerryError:
        try:
            message = json.loads(response.read())["Message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300] if not response.is_stream_consumed else ""
        if response.status_code in (401, 403):
            return BackendUnavailable(f"{self.name}: {doing}: the node refused our credentials "
                                      f"({response.status_code}): {message}")
        if response.status_code in (404, 405):
            return BackendError(f"{self.name}: {doing}: the node does not offer this RPC call "
                                f"({response.status_code}); is {self.config.api_url} a Kubo RPC API?")
        if "not pinned" in message:
            return KeyNotFound(f"{self.name}: {doing}: not pinned")
        if "timed out" in message or "deadline exceeded" in message:
            return BackendUnavailable(f"{self.name}: {doing}: the node did not find the blocks within "
                                      f"{self.config.timeout:g} s ({message})")
        return BackendError(f"{self.name}: {doing}: {message or response.status_code}")

    def _call(self, path: str, doing: str, **params: Any) -> list[dict]:
        """POST one RPC call; its JSON answer as a list of objects (calls may stream several)."""
        try:
            response = self.client.post(path, params=self._params(params))
        except httpx.HTTPError as exc:
            raise self._fail(exc, doing) from exc
        if response.status_code != 200:
            raise self._error(response, doing)
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    def _stream(self, path: str, doing: str, **params: Any) -> httpx.Response:
        request = self.client.build_request("POST", path, params=self._params(params))
        try:
            response = self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._fail(exc, doing) from exc
        if response.status_code != 200:
            try:
                raise self._error(response, doing)
            finally:
                response.close()
        return response

    def pinned(self, cid: str) -> bool:
        try:
            self._call("/pin/ls", f"pin ls {cid}", arg=cid, type="recursive")
        except KeyNotFound:
            return False
        return True

    def block_size(self, cid: str) -> int:
        """The size of one block the node holds (block stat)."""
        return int(self._call("/block/stat", f"block stat {cid}", arg=cid)[-1]["Size"])

    def _size(self, cid: str) -> int:
        if cid.startswith("bafk"):  # a raw block is the whole file
            return self.block_size(cid)
        return int(self._call("/files/stat", f"files stat {cid}", arg=f"/ipfs/{cid}")[-1]["Size"])

    def add(self, chunks: Iterable[bytes], size: int | None = None,
            expect: str | Callable[[], str] | None = None) -> tuple[str, int]:
        """Add the bytes, streamed, and pin them if they make the expected CID (given, or
        asked of `expect()` once every byte was sent, e.g. the copying hasher's digest).
        Returns (CID, bytes). A mismatch raises ChecksumMismatch and pins nothing."""
        boundary = os.urandom(16).hex()
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="object"\r\n'
                   "Content-Type: application/octet-stream\r\n\r\n").encode()
            for chunk in chunks:
                sent += len(chunk)
                if size is not None and sent > size:
                    raise _Announced(sent)
                yield chunk
            if size is not None and sent != size:
                raise _Announced(sent)
            yield f"\r\n--{boundary}--\r\n".encode()

        try:
            response = self.client.post("/add", params=self._params(ADD_PARAMS), content=body(),
                                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        except _Announced as exc:
            raise BackendError(f"{self.name}: announced {size} bytes but the source gave "
                               f"{'at least ' if exc.sent > (size or 0) else ''}{exc.sent}") from None
        except httpx.HTTPError as exc:
            raise self._fail(exc, "add") from exc
        if response.status_code != 200:
            raise self._error(response, "add")
        added = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        if not added or "Hash" not in added[-1]:
            raise BackendError(f"{self.name}: add: no CID in the node's answer: {response.text[:200]!r}")
        cid = normalize_cid(added[-1]["Hash"])
        wanted = expect() if callable(expect) else expect
        if wanted is not None and cid != wanted:
            raise ChecksumMismatch(
                f"{self.name}: the node made CID {cid} of these {sent} bytes, expected {wanted}: "
                "not pinned (is the node's add configured differently, or did the bytes change?)")
        self._call("/pin/add", f"pin add {cid}", arg=cid, recursive="true")
        return cid, sent

    def export_car(self, key: str) -> Iterator[bytes]:
        """The CARv1 of a pinned object's DAG (`dag export`), streamed."""
        cid = check_cid(key)
        if not self.pinned(cid):
            raise KeyNotFound(f"{self.name}: {cid} is not pinned")
        response = self._stream("/dag/export", f"dag export {cid}", arg=cid)
        return _Body(response, CHUNK_SIZE, None, f"{self.name}:{cid}")

    # -- the backend verbs -------------------------------------------------------------

    def stat(self, key: str) -> ObjectStat:
        cid = check_cid(key)
        if not self.pinned(cid):
            raise KeyNotFound(f"{self.name}: {cid} is not pinned")
        return ObjectStat(cid, self._size(cid))

    def read(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        stat = self.stat(key)
        response = self._stream("/cat", f"cat {stat.key}", arg=stat.key)
        return _Body(response, chunk_size, stat.size, f"{self.name}:{stat.key}")

    def write(self, key: str, chunks: Iterable[bytes], size: int | None = None) -> int:
        return self.add(chunks, size, expect=check_cid(key))[1]

    def delete(self, key: str) -> bool:
        cid = check_cid(key)
        try:
            self._call("/pin/rm", f"pin rm {cid}", arg=cid, recursive="true")
        except KeyNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectStat]:
        _cid_prefix(prefix)
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[ObjectStat]:
        cids = set()
        for entry in self._call("/pin/ls", "pin ls", type="recursive", stream="true"):
            try:
                cid = check_cid(entry["Cid"] if "Cid" in entry else next(iter(entry["Keys"])))
            except InvalidKey:
                continue  # CIDv0 and other pins made outside Ferry
            if cid.startswith(prefix):
                cids.add(cid)
        for cid in sorted(cids):
            try:
                yield ObjectStat(cid, self._size(cid))
            except KeyNotFound:
                continue  # unpinned while listing

    def check(self) -> None:
        answer = self._call("/version", "version")
        if not answer or "Version" not in answer[-1]:
            raise BackendUnavailable(f"{self.name}: {self.config.api_url} answered /api/v0/version "
                                     "without a version: not a Kubo RPC API")

    def capacity(self) -> Capacity:
        stat = self._call("/repo/stat", "repo stat")[-1]
        limit = int(stat.get("StorageMax") or 0)
        return Capacity(used=int(stat["RepoSize"]), limit=limit if 0 < limit < _NO_LIMIT else None)


class _Announced(Exception):
    def __init__(self, sent: int):
        self.sent = sent
