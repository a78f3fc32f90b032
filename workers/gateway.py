"""The "gateway" driver: read-only retrieval of UnixFS files by CID from IPFS trustless
HTTP gateways (https://specs.ipfs.tech/http-gateways/trustless-gateway/), Lassie's role.

Nothing a gateway sends is trusted. A read walks the file's DAG itself, depth first from
the root, and asks for each block in that order: every block must be the one the walk
needs next and hash to its CID, and every dag-pb node must be a UnixFS File (or Raw)
node whose sizes agree with its children's (blocksizes, filesize). A block's bytes are
yielded only after all of that is checked, so corrupt data is never yielded.

Settings:
  gateways        base URLs (http/https), tried in order; a path prefix is kept
  timeout         seconds for each request's connect and each read (default 30)
  mode            "car" (default): one CAR stream per read, `format=car&dag-scope=all`,
                  asking for DFS order with duplicates; "raw": one `format=raw` request
                  per block from the start (for gateways that serve only blocks)
  max_block_size  largest block accepted (default 2 MiB, the IPFS network's limit), so a
                  lying gateway cannot make a read buffer a huge "block"

Failover: a gateway fails on a transport error, an HTTP error, a wrong Content-Type, a
block that does not hash to its CID, a block out of DFS order, or a stream that ends
early. Before the read has yielded a byte, the next gateway's CAR is tried from the
root; after, the same walk continues from the block it stopped at, with `format=raw`
requests to the gateways not yet failed (no restart, no byte yielded twice). Each
failover is logged as a warning. When no gateway is left the read raises
ChecksumMismatch if any gateway sent wrong bytes, KeyNotFound if the root is on none of
them (they answered 404/410), BackendUnavailable if one could not be reached or lacked
a block mid-file, and BackendError otherwise (e.g. none speaks the protocol); the
message names each gateway's failure. `read` fetches and checks the root block before
it returns, so KeyNotFound comes from the call, not from the first chunk.

Memory stays at a few blocks whatever the file's size: the block being yielded, the
CAR reader's one section, a 1 MiB cache of recent blocks (for gateways that send a
repeated block only once, `dups=n`, as IPFS nodes' `dag export` does), and the walk's
pending links (bounded by the DAG's depth, refused past MAX_DEPTH levels).

Honest limits: only UnixFS files whose blocks are CIDv1 sha2-256 raw or dag-pb are read
(a directory, an identity-inlined or CIDv0 link raises MalformedDag); a gateway cannot
list, so `list` answers only for a prefix that is a whole CID; the CAR header's roots
are ignored, as the spec asks of clients; a gateway whose CAR does not promise DFS order
is tried all the same and dropped at its first block out of order; in "car" mode a
gateway that refuses CARs but serves blocks is not retried per block (use mode "raw").
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import ClassVar, Literal, Self

import httpx
from pydantic import Field, field_validator

from ferry.errors import (
    BackendError,
    BackendUnavailable,
    ChecksumMismatch,
    FerryError,
    InvalidKey,
    KeyNotFound,
    ReadOnlyBackend,
)
from workers.base import CHUNK_SIZE, Backend, DriverConfig, ObjectStat, check_prefix
from workers.car import (
    DAG_PB,
    RAW,
    CarReader,
    MalformedCar,
    MalformedDag,
    SectionTooLarge,
    cid_bytes,
    decode_file_node,
)
from workers.cid import _cid_string, check_cid

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_DEPTH = 64  # a balanced DAG of 174 links is 6 levels deep for 2^50 bytes
CACHE_BYTES = MiB
CAR_TYPE = "application/vnd.ipld.car"
RAW_TYPE = "application/vnd.ipld.raw"
PROBE_CID = "bafkqaaa"  # the empty identity CID, the spec's probe path

# What one gateway's failure means for the error a read ends with.
ABSENT = "absent"  # 404/410, or a CAR that ends cleanly before a block: it lacks the data
DOWN = "unavailable"  # unreachable, 5xx, timed out, cut off, out of order: maybe later
LIED = "lied"  # bytes that do not hash to their CID, or a CAR that is not a CAR
REFUSED = "refused"  # does not speak the trustless protocol (wrong type, 4xx, huge block)


class GatewayConfig(DriverConfig):
    gateways: list[str] = Field(min_length=1)
    timeout: float = Field(default=30.0, gt=0)
    mode: Literal["car", "raw"] = "car"
    max_block_size: int = Field(default=2 * MiB, ge=1024, le=64 * MiB)

    @field_validator("gateways")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        """Base URLs without a trailing '/', so `{gateway}/ipfs/{cid}` is well-formed."""
        out: list[str] = []
        for url in urls:
            try:
                parsed = httpx.URL(url)
            except httpx.InvalidURL as exc:
                raise ValueError(f"{url!r} is not a URL: {exc}") from None
            if parsed.scheme not in ("http", "https") or not parsed.host or parsed.query or parsed.fragment:
                raise ValueError(f"{url!r}: a gateway is an http(s) base URL without query or fragment")
            base = url.rstrip("/")
            if base in out:
                raise ValueError(f"gateway {base!r} is listed twice")
            out.append(base)
        return out


class _Fault(Exception):
    """One gateway's failure on one request; `kind` is one of the constants above."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _media_type(response: httpx.Response) -> tuple[str, dict[str, str]]:
    """('type/subtype', {param: value}) of a response's Content-Type, lower-cased."""
    media, *params = response.headers.get("content-type", "").split(";")
    pairs = (p.split("=", 1) for p in params if "=" in p)
    return media.strip().lower(), {k.strip().lower(): v.strip().strip('"').lower() for k, v in pairs}


def _transport_fault(exc: httpx.HTTPError) -> _Fault:
    if isinstance(exc, httpx.TimeoutException):
        return _Fault(DOWN, f"timed out ({type(exc).__name__})")
    return _Fault(DOWN, f"{type(exc).__name__}: {exc}")


def _open(client: httpx.Client, url: str, params: dict[str, str], media: str,
          accept: str | None = None) -> httpx.Response:
    """A streamed 200 response of type `media` to GET `url`; _Fault otherwise (closed)."""
    request = client.build_request("GET", url, params=params, headers={"Accept": accept or media})
    try:
        response = client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise _transport_fault(exc) from exc
    if response.status_code != 200:
        response.close()
        code = response.status_code
        kind = ABSENT if code in (404, 410) else DOWN if code >= 500 or code == 429 else REFUSED
        raise _Fault(kind, f"HTTP {code}")
    got, options = _media_type(response)
    if got != media or (media == CAR_TYPE and options.get("version", "1") != "1"):
        response.close()
        shown = response.headers.get("content-type") or "no Content-Type"
        raise _Fault(REFUSED, f"answered {shown}, not {media}: not a trustless gateway")
    return response


def _digest_of(cid: str) -> bytes:
    return cid_bytes(cid)[4:]


class _RecentBlocks:
    """The last few blocks seen, up to CACHE_BYTES: a file's repeated blocks (a run of
    zeros) are usually near each other, and a dups=n gateway sends each only once."""

    def __init__(self) -> None:
        self._blocks: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, cid: str) -> bytes | None:
        block = self._blocks.get(cid)
        if block is not None:
            self._blocks.move_to_end(cid)
        return block

    def put(self, cid: str, block: bytes) -> None:
        if cid in self._blocks or len(block) > CACHE_BYTES:
            return
        self._blocks[cid] = block
        self._bytes += len(block)
        while self._bytes > CACHE_BYTES:
            self._bytes -= len(self._blocks.popitem(last=False)[1])


class _Gateways:
    """The gateways a read (or stat) may still use, what each one's failure was, and
    per-block `format=raw` fetching with failover. Owns the HTTP client."""

    def __init__(self, config: GatewayConfig, what: str):
        self.config = config
        self.what = what
        self.alive = list(config.gateways)
        self.failures: list[tuple[str, _Fault]] = []
        self.cache = _RecentBlocks()
        self.client = httpx.Client(timeout=config.timeout, follow_redirects=True)

    def record(self, gateway: str, fault: _Fault, cid: str) -> None:
        """Drop `gateway` for the rest of this read, and say so."""
        self.failures.append((gateway, fault))
        if gateway in self.alive:
            self.alive.remove(gateway)
        left = f"trying {self.alive[0]}" if self.alive else "no gateway left"
        log.warning("gateway %s failed on block %s of %s (%s): %s; %s",
                    gateway, cid, self.what, fault.kind, fault.reason, left)

    def give_up(self, root_found: bool) -> FerryError:
        """The error for a read no gateway can finish, naming every gateway's failure."""
        kinds = {fault.kind for _, fault in self.failures}
        detail = "; ".join(f"{gateway}: {fault.reason}" for gateway, fault in self.failures)
        if LIED in kinds:
            return ChecksumMismatch(f"{self.what}: a gateway sent bytes that are not its blocks, "
                                    f"and no other served them intact ({detail})")
        if DOWN in kinds or (ABSENT in kinds and root_found):
            return BackendUnavailable(f"{self.what}: no gateway could serve it now ({detail})")
        if ABSENT in kinds:
            return KeyNotFound(f"{self.what} is on none of the gateways ({detail})")
        return BackendError(f"{self.what}: no gateway serves it as a trustless gateway ({detail})")

    def raw(self, cid: str, root_found: bool = True) -> bytes:
        """Block `cid`, verified, from the cache or the first gateway left that serves it."""
        block = self.cache.get(cid)
        while block is None:
            if not self.alive:
                raise self.give_up(root_found)
            gateway = self.alive[0]
            try:
                block = fetch_raw(self.client, gateway, cid, self.config.max_block_size)
            except _Fault as fault:
                self.record(gateway, fault, cid)
        self.cache.put(cid, block)
        return block

    def close(self) -> None:
        self.client.close()


def fetch_raw(client: httpx.Client, gateway: str, cid: str, max_block_size: int) -> bytes:
    """One block by `format=raw`, refused past `max_block_size` and checked against its CID."""
    response = _open(client, f"{gateway}/ipfs/{cid}", {"format": "raw"}, RAW_TYPE)
    try:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_block_size:
            raise _Fault(REFUSED, f"block {cid} is {declared} bytes, over max_block_size {max_block_size}")
        pieces, received = [], 0
        for piece in response.iter_bytes():
            pieces.append(piece)
            received += len(piece)
            if received > max_block_size:
                raise _Fault(REFUSED, f"block {cid} is over max_block_size {max_block_size}")
    except httpx.HTTPError as exc:
        raise _transport_fault(exc) from exc
    finally:
        response.close()
    block = b"".join(pieces)
    if hashlib.sha256(block).digest() != _digest_of(cid):
        raise _Fault(LIED, f"block {cid} does not hash to its CID")
    return block


class _Body:
    """A response's byte chunks, noting whether the stream ended (to tell a CAR cut short
    from a malformed one) and turning transport errors into a _Fault."""

    def __init__(self, response: httpx.Response):
        self._chunks = response.iter_bytes()
        self.ended = False

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            self.ended = True
            raise
        except httpx.HTTPError as exc:
            raise _transport_fault(exc) from exc


class _SeenDigests:
    """Which blocks a CAR stream has sent, as 64-bit hashes, up to LIMIT of them: a
    dups=n gateway skips a block it sent before, and this tells such a skip from a
    missing block. Past the limit any skip is taken as a duplicate (and fetched raw)."""

    LIMIT = 1 << 15

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self.full = False

    def add(self, cid: str) -> None:
        if len(self._seen) < self.LIMIT:
            self._seen.add(hash(cid))
        else:
            self.full = True

    def __contains__(self, cid: str) -> bool:
        return self.full or hash(cid) in self._seen


class _CarStream:
    """One gateway's CAR of the whole DAG, read block by block as the walk asks."""

    def __init__(self, pool: _Gateways, gateway: str, root: str):
        self.gateway = gateway
        self._pool = pool
        params = {"format": "car", "dag-scope": "all", "car-version": "1", "car-order": "dfs", "car-dups": "y"}
        accept = f"{CAR_TYPE}; version=1; order=dfs; dups=y"
        self._response = _open(pool.client, f"{gateway}/ipfs/{root}", params, CAR_TYPE, accept)
        _, ctype = _media_type(self._response)
        if ctype.get("order", "unk") not in ("dfs", "unk"):
            self.close()
            raise _Fault(REFUSED, f"its CAR is in order={ctype['order']}, which cannot be checked while streaming")
        # dups=y: every repeat is in the stream. Otherwise (dups=n, or unsaid) a repeat
        # may be skipped, and per the spec an unasked repeat must be ignored.
        self._strict = ctype.get("dups") == "y"
        self._body = _Body(self._response)
        self._next: tuple[str, int, bytes] | None = None
        self._seen = _SeenDigests()
        self._reader: CarReader | None = None
        self._blocks: Iterator[tuple[str, int, bytes]] | None = None

    def _peek(self) -> tuple[str, int, bytes] | None:
        """The next block of the stream (hash-checked), without taking it."""
        if self._next is None:
            try:
                if self._blocks is None:
                    self._reader = CarReader(self._body, max_section=self._pool.config.max_block_size + 64)
                    self._blocks = self._reader.blocks()
                self._next = next(self._blocks, None)
            except SectionTooLarge as exc:
                raise _Fault(REFUSED, f"{exc} (max_block_size)") from exc
            except MalformedCar as exc:
                raise _Fault(DOWN if self._body.ended else LIED, f"{exc}") from exc
            except ChecksumMismatch as exc:
                raise _Fault(LIED, str(exc)) from exc
        return self._next

    def get(self, cid: str) -> bytes:
        while True:
            upcoming = self._peek()
            if upcoming is not None and upcoming[0] == cid:
                self._next = None
                self._seen.add(cid)
                self._pool.cache.put(cid, upcoming[2])
                return upcoming[2]
            if not self._strict:
                if cid in self._seen:  # sent before, so skipped now
                    cached = self._pool.cache.get(cid)
                    if cached is not None:
                        return cached
                    block = fetch_raw(self._pool.client, self.gateway, cid, self._pool.config.max_block_size)
                    self._pool.cache.put(cid, block)
                    return block
                if upcoming is not None and upcoming[0] in self._seen:  # a repeat not needed here
                    self._next = None
                    continue
            if upcoming is None:
                raise _Fault(ABSENT, f"its CAR ends before block {cid}")
            raise _Fault(DOWN, f"its CAR sent block {upcoming[0]} where the DFS walk needs {cid}")

    def finish(self) -> None:
        """Called once the walk has every block: more in the stream is logged, not used."""
        try:
            extra = self._peek()
        except _Fault as fault:
            extra, reason = None, fault.reason
        else:
            reason = f"block {extra[0]}" if extra else ""
        if extra is not None or reason:
            log.warning("gateway %s sent more than the DAG after its last block (%s); ignored",
                        self.gateway, reason)

    def close(self) -> None:
        self._response.close()


class _Restart(Exception):
    """The CAR source failed before any byte was yielded: walk again from the root."""


class GatewayRead(Iterator[bytes]):
    """The bytes of one UnixFS file, walked depth first and checked block by block.

    Built by `GatewayBackend.read`, which has already fetched and checked the root. Like
    workers.base.ChunkReader, it closes its HTTP streams when exhausted, closed, or
    dropped, and raises FerryErrors only.
    """

    _pool: _Gateways | None = None
    _source: _CarStream | None = None

    def __init__(self, config: GatewayConfig, root: str, chunk_size: int):
        self._config = config
        self._root = root
        self._chunk_size = chunk_size
        self._pool = _Gateways(config, root)
        self._root_found = False
        self._emitted = 0
        self._total: int | None = None
        self._per_block = config.mode == "raw"  # set in "car" mode by a failure after bytes were yielded
        self._restart()
        try:
            while not self._root_found:  # eager: KeyNotFound and the like come from read()
                self._step()
        except BaseException:
            self.close()
            raise

    def _restart(self) -> None:
        # (cid, codec, file bytes expected under it or None for the root, depth)
        self._stack: list[tuple[str, int, int | None, int]] = [(self._root, cid_bytes(self._root)[1], None, 0)]
        self._pending = b""
        self._offset = 0

    def __iter__(self) -> GatewayRead:
        return self

    def __next__(self) -> bytes:
        if self._pool is None:
            raise StopIteration
        try:
            while self._offset >= len(self._pending):
                if not self._stack:
                    self._finish()
                    raise StopIteration
                self._step()
        except BaseException:
            self.close()
            raise
        start, end = self._offset, self._offset + self._chunk_size
        chunk = self._pending if start == 0 and end >= len(self._pending) else self._pending[start:end]
        self._offset += len(chunk)
        self._emitted += len(chunk)
        return chunk

    def _step(self) -> None:
        """Take the next block of the walk, check it, queue its links and its bytes."""
        cid, codec, want, depth = self._stack.pop()
        try:
            block = self._block(cid)
        except _Restart:
            self._restart()
            return
        what = f"block {cid} of {self._root}"
        if codec == RAW:
            size, data = len(block), block
        else:
            node = decode_file_node(block, what)
            size, data = node.size, node.data
            if node.links and depth + 1 > MAX_DEPTH:
                raise MalformedDag(f"{what}: the DAG is deeper than {MAX_DEPTH} levels")
            children = []
            for link, blocksize in zip(node.links, node.blocksizes, strict=True):
                if len(link.cid) != 36 or link.cid[0] != 1 or link.cid[1] not in (RAW, DAG_PB) \
                        or link.cid[2:4] != b"\x12\x20":
                    raise MalformedDag(f"{what} links to a block that is not a CIDv1 sha2-256 raw or "
                                       "dag-pb block, which this driver cannot verify")
                children.append((_cid_string(link.cid), link.cid[1], blocksize, depth + 1))
            self._stack.extend(reversed(children))
        if want is not None and size != want:
            raise MalformedDag(f"{what} holds {size} bytes of the file, but its parent says {want}")
        if cid == self._root:
            self._root_found, self._total = True, size
        self._pending, self._offset = data, 0

    def _block(self, cid: str) -> bytes:
        """Block `cid`, from the current CAR stream or, once bytes were yielded, per block."""
        pool = self._pool
        assert pool is not None
        if self._per_block:
            return pool.raw(cid, self._root_found)
        while True:
            if self._source is None:
                if not pool.alive:
                    raise pool.give_up(self._root_found)
                gateway = pool.alive[0]
                try:
                    self._source = _CarStream(pool, gateway, self._root)
                except _Fault as fault:
                    pool.record(gateway, fault, self._root)
                    continue
            try:
                return self._source.get(cid)
            except _Fault as fault:
                source, self._source = self._source, None
                source.close()
                pool.record(source.gateway, fault, cid)
                if self._emitted:
                    self._per_block = True
                    return pool.raw(cid, self._root_found)
                if cid != self._root:
                    raise _Restart from None

    def _finish(self) -> None:
        if self._emitted != self._total:  # cannot happen if every node's sizes were checked
            raise ChecksumMismatch(f"{self._root}: read {self._emitted} bytes, the DAG says {self._total}")
        if self._source is not None:
            self._source.finish()
        self.close()

    def close(self) -> None:
        source, self._source = self._source, None
        pool, self._pool = self._pool, None
        if source is not None:
            source.close()
        if pool is not None:
            pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class GatewayBackend(Backend):
    """Files read by CID from `config.gateways`; nothing is ever written there."""

    driver: ClassVar[str] = "gateway"
    Config: ClassVar[type[DriverConfig]] = GatewayConfig
    content_addressed: ClassVar[bool] = True
    read_only: ClassVar[bool] = True
    config: GatewayConfig

    def read(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        return GatewayRead(self.config, check_cid(key), chunk_size)

    def stat(self, key: str) -> ObjectStat:
        """The size from the root block alone (a raw block's length, or a dag-pb root's
        UnixFS size), fetched `format=raw` with failover."""
        cid = check_cid(key)
        pool = _Gateways(self.config, cid)
        try:
            block = pool.raw(cid, root_found=False)
        finally:
            pool.close()
        size = len(block) if cid_bytes(cid)[1] == RAW else decode_file_node(block, f"root block {cid}").size
        return ObjectStat(key=cid, size=size)

    def list(self, prefix: str = "") -> Iterator[ObjectStat]:
        """A gateway cannot list: a prefix that is a whole CID yields that object (so a
        migration can name one object by CID); anything else is refused at the call."""
        check_prefix(prefix)
        try:
            cid = check_cid(prefix)
        except InvalidKey:
            raise BackendError(f"backend {self.name!r}: a gateway cannot list; name objects by CID "
                               f"(got prefix {prefix!r})") from None
        return iter([self.stat(cid)])

    def write(self, key: str, chunks: Iterable[bytes], size: int | None = None) -> int:
        check_cid(key)
        raise ReadOnlyBackend(f"backend {self.name!r} is a gateway: it is read-only")

    def add(self, chunks: Iterable[bytes], size: int | None = None, expect: object = None) -> tuple[str, int]:
        raise ReadOnlyBackend(f"backend {self.name!r} is a gateway: it is read-only")

    def delete(self, key: str) -> bool:
        check_cid(key)
        raise ReadOnlyBackend(f"backend {self.name!r} is a gateway: it is read-only")

    def check(self) -> None:
        """Passes if at least one gateway answers the spec's probe, `GET /ipfs/bafkqaaa`
        as a raw block, with 200 and an empty body."""
        failures = []
        with httpx.Client(timeout=self.config.timeout, follow_redirects=True) as client:
            for gateway in self.config.gateways:
                try:
                    response = _open(client, f"{gateway}/ipfs/{PROBE_CID}", {"format": "raw"}, RAW_TYPE)
                    try:
                        body = next(response.iter_bytes(), b"")
                    except httpx.HTTPError as exc:
                        raise _transport_fault(exc) from exc
                    finally:
                        response.close()
                    if body:
                        raise _Fault(REFUSED, f"answered the empty block {PROBE_CID} with bytes")
                    return
                except _Fault as fault:
                    failures.append(f"{gateway}: {fault.reason}")
        raise BackendUnavailable(f"backend {self.name!r}: no gateway answers the trustless probe "
                                 f"({'; '.join(failures)})")
