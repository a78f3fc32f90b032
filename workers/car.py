"""CARv1 streams of an object's UnixFS DAG: written while the bytes stream through the
same `ContentHasher` that computes the CID, and read back with every block's hash checked.

A CARv1 is a varint-framed dag-cbor header `{"roots": [CID], "version": 1}` followed by
varint-framed `CID bytes + block` sections. Ferry writes the blocks as the hasher finishes
them (leaves in order, each parent after its children), so memory stays at one chunk plus
the pending links, and the header's root (known from the catalog) is checked at the end.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ferry.errors import ChecksumMismatch
from workers.cid import ContentHasher, _cid_string, _varint

SHA2_256 = 0x12
RAW, DAG_PB = 0x55, 0x70


class MalformedCar(ChecksumMismatch):
    """Raised when a CAR stream is not a well-formed CARv1 of sha2-256 blocks."""

    code = "malformed_car"


class SectionTooLarge(MalformedCar):
    """Raised when a CAR section is longer than the reader's `max_section` allows."""

    code = "car_section_too_large"


class MalformedDag(ChecksumMismatch):
    """Raised when a verified block is not part of a UnixFS file this reader can stream:
    a directory, a link to a CID it cannot verify, sizes that contradict each other."""

    code = "malformed_dag"


def cid_bytes(cid: str) -> bytes:
    """The binary form of a base32 CIDv1 ("b...")."""
    if not cid.startswith("b"):
        raise ValueError(f"{cid!r}: expected a base32 CIDv1")
    body = cid[1:].upper()
    return base64.b32decode(body + "=" * (-len(body) % 8))


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for extra, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * width):
            return bytes([major << 5 | extra]) + n.to_bytes(width, "big")
    raise ValueError("too large for CBOR")


def header(*roots: bytes) -> bytes:
    """The framed dag-cbor header: map keys in dag-cbor order ("roots" before "version"),
    each root as tag 42 over a byte string with the multibase identity prefix 0x00."""
    links = b"".join(b"\xd8\x2a" + _cbor_head(2, len(root) + 1) + b"\x00" + root for root in roots)
    body = (_cbor_head(5, 2) + _cbor_head(3, 5) + b"roots" + _cbor_head(4, len(roots)) + links
            + _cbor_head(3, 7) + b"version" + _cbor_head(0, 1))
    return _varint(len(body)) + body


def section(cid: bytes, block: bytes) -> bytes:
    """One framed CAR section: varint length, the CID's bytes, the block."""
    return _varint(len(cid) + len(block)) + cid + block


def write_car(chunks: Iterable[bytes], root_cid: str) -> Iterator[bytes]:
    """The CARv1 of the object whose bytes are `chunks` and whose CID is `root_cid`.
    Raises ChecksumMismatch at the end if the bytes do not make that CID (what was
    yielded must then be thrown away)."""
    pending: list[bytes] = []
    hasher = ContentHasher(on_block=lambda cid, block: pending.append(section(cid, block)))
    yield header(cid_bytes(root_cid))
    for chunk in chunks:
        hasher.update(chunk)
        if pending:
            yield b"".join(pending)
            pending.clear()
    digest = hasher.digest()
    if pending:
        yield b"".join(pending)
    if digest.cid != root_cid:
        raise ChecksumMismatch(f"the bytes make CID {digest.cid}, not {root_cid}: the CAR is not of that object")


class _Bytes:
    """Reads exact byte counts and varints from an iterable of chunks."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._buf = bytearray()

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                return False
            self._buf += chunk
        return True

    def at_end(self) -> bool:
        return not self._fill(1)

    def take(self, n: int) -> bytes:
        if not self._fill(n):
            raise MalformedCar(f"the CAR ends in the middle of a section ({len(self._buf)} of {n} bytes)")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def varint(self) -> int:
        n = shift = 0
        while True:
            byte = self.take(1)[0]
            n |= (byte & 0x7F) << shift
            if byte < 0x80:
                return n
            shift += 7
            if shift > 63:
                raise MalformedCar("a varint in the CAR is too long")


def _varint_at(data: bytes, pos: int, what: str = "CAR", error: type[ChecksumMismatch] = MalformedCar
               ) -> tuple[int, int]:
    """The unsigned varint at `pos` and the position after it; `error` if it is cut short
    or longer than 64 bits."""
    n = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise error(f"{what}: a varint is cut short or too long")
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if byte < 0x80:
            return n, pos
        shift += 7


def _split_cid(section: bytes) -> tuple[bytes, int, bytes, bytes]:
    """(cid bytes, codec, sha256 digest, block) of a section; CIDv1 with sha2-256 only."""
    version, pos = _varint_at(section, 0)
    if version != 1:
        raise MalformedCar(f"a block has a CIDv{version}; only CIDv1 is read")
    codec, pos = _varint_at(section, pos)
    code, pos = _varint_at(section, pos)
    length, pos = _varint_at(section, pos)
    if code != SHA2_256 or length != 32:
        raise MalformedCar(f"a block's multihash is 0x{code:x}/{length}; only sha2-256 is read")
    return section[:pos + 32], codec, section[pos:pos + 32], section[pos + 32:]


def _header_roots(body: bytes) -> list[str]:
    """The roots of a dag-cbor CARv1 header (a minimal CBOR reader for that one shape)."""
    pos = 0

    def head() -> tuple[int, int]:
        nonlocal pos
        if pos >= len(body):
            raise MalformedCar("the CAR header is truncated")
        first = body[pos]
        pos += 1
        major, info = first >> 5, first & 0x1F
        if info < 24:
            return major, info
        width = {24: 1, 25: 2, 26: 4, 27: 8}.get(info)
        if width is None:
            raise MalformedCar("the CAR header uses CBOR this reader does not accept")
        value = int.from_bytes(body[pos:pos + width], "big")
        pos += width
        return major, value

    def item() -> object:
        nonlocal pos
        major, n = head()
        if major == 0:
            return n
        if major in (2, 3):
            raw = body[pos:pos + n]
            pos += n
            return raw if major == 2 else raw.decode()
        if major == 4:
            return [item() for _ in range(n)]
        if major == 5:
            return {item(): item() for _ in range(n)}
        if major == 6 and n == 42:
            link = item()
            if not isinstance(link, bytes) or not link.startswith(b"\x00"):
                raise MalformedCar("a CID link in the CAR header is malformed")
            return _cid_string(link[1:])
        raise MalformedCar("the CAR header uses CBOR this reader does not accept")

    decoded = item()
    if not isinstance(decoded, dict) or decoded.get("version") != 1 or not isinstance(decoded.get("roots"), list):
        raise MalformedCar("not a CARv1 header")
    return decoded["roots"]


class CarReader:
    """A CARv1 stream: `roots`, then `blocks()` yields (cid, codec, block) with each block's
    sha256 checked against its CID (ChecksumMismatch names the CID that lied).

    `max_section`, when set, refuses a header or section longer than that before buffering
    it (SectionTooLarge), so a lying peer cannot make the reader hold a huge "block"."""

    def __init__(self, chunks: Iterable[bytes], max_section: int | None = None):
        self._in = _Bytes(chunks)
        self._max = max_section
        self.roots = _header_roots(self._in.take(self._length()))

    def _length(self) -> int:
        n = self._in.varint()
        if self._max is not None and n > self._max:
            raise SectionTooLarge(f"a CAR section of {n} bytes is over the {self._max}-byte limit")
        return n

    def blocks(self) -> Iterator[tuple[str, int, bytes]]:
        while not self._in.at_end():
            cid, codec, digest, block = _split_cid(self._in.take(self._length()))
            if hashlib.sha256(block).digest() != digest:
                raise ChecksumMismatch(f"block {_cid_string(cid)} does not hash to its CID")
            yield _cid_string(cid), codec, block


def _links(node: bytes) -> list[bytes]:
    """The link CIDs of a dag-pb node, in order (PBNode field 2, PBLink field 1)."""
    links, pos = [], 0
    while pos < len(node):
        key, pos = _varint_at(node, pos)
        length, pos = _varint_at(node, pos)
        field, body = key >> 3, node[pos:pos + length]
        pos += length
        if field == 2:
            inner = 0
            while inner < len(body):
                k, inner = _varint_at(body, inner)
                if k & 7 == 2:
                    n, inner = _varint_at(body, inner)
                    if k >> 3 == 1:
                        links.append(body[inner:inner + n])
                    inner += n
                else:
                    _, inner = _varint_at(body, inner)
    return links


def content(root: str, get_block: Callable[[str], tuple[int, bytes]]) -> Iterator[bytes]:
    """The file bytes of a raw-leaves UnixFS DAG, walking it from `root` in order;
    `get_block(cid)` returns (codec, verified block)."""
    codec, block = get_block(root)
    if codec == RAW:
        yield block
        return
    if codec != DAG_PB:
        raise MalformedCar(f"block {root} has codec 0x{codec:x}; a UnixFS file is dag-pb over raw leaves")
    for link in _links(block):
        yield from content(_cid_string(link), get_block)



# UnixFS Data.Type values a file is made of: Raw (old importers' leaves) and File.
UNIXFS_RAW, UNIXFS_FILE = 0, 2
_UNIXFS_TYPES = {1: "Directory", 3: "Metadata", 4: "Symlink", 5: "HAMTShard"}


@dataclass(frozen=True, slots=True)
class PBLink:
    """One dag-pb link: the binary CID it points to and its Tsize (cumulative DAG bytes)."""

    cid: bytes
    tsize: int | None


@dataclass(frozen=True, slots=True)
class FileNode:
    """A dag-pb block read as a piece of a UnixFS file: its own bytes (`data`), then the
    bytes under each link in order, `blocksizes[i]` of them under `links[i]`."""

    unixfs_type: int
    data: bytes
    links: list[PBLink]
    blocksizes: list[int]
    filesize: int | None

    @property
    def size(self) -> int:
        """The file bytes this node stands for."""
        return len(self.data) + sum(self.blocksizes)


def _pb_varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    return _varint_at(buf, pos, what, MalformedDag)


def _pb_fields(buf: bytes, what: str) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a protobuf message: an int for varint and
    fixed-width fields, bytes for length-delimited ones. MalformedDag if it is cut."""
    pos = 0
    while pos < len(buf):
        key, pos = _pb_varint(buf, pos, what)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _pb_varint(buf, pos, what)
            yield field, value
            continue
        width = {1: 8, 5: 4}.get(wire)
        if wire == 2:
            width, pos = _pb_varint(buf, pos, what)
        elif width is None:
            raise MalformedDag(f"{what}: protobuf wire type {wire} is not valid")
        if pos + width > len(buf):
            raise MalformedDag(f"{what}: a field runs past the end of the block")
        raw = buf[pos:pos + width]
        pos += width
        yield field, raw if wire == 2 else int.from_bytes(raw, "little")


def decode_pb(block: bytes, what: str = "dag-pb block") -> tuple[list[PBLink], bytes | None]:
    """The links and Data of a dag-pb node. The dag-pb spec allows no other fields."""
    links: list[PBLink] = []
    data: bytes | None = None
    for field, value in _pb_fields(block, what):
        if field == 1 and isinstance(value, bytes) and data is None:
            data = value
        elif field == 2 and isinstance(value, bytes):
            cid: bytes | None = None
            tsize: int | None = None
            for f, v in _pb_fields(value, what):
                if f == 1 and isinstance(v, bytes):
                    cid = v
                elif f == 3 and isinstance(v, int):
                    tsize = v
                elif not (f == 2 and isinstance(v, bytes)):  # Name: meaningless inside a file
                    raise MalformedDag(f"{what}: a link has an unknown field {f}")
            if cid is None:
                raise MalformedDag(f"{what}: a link has no CID")
            links.append(PBLink(cid, tsize))
        else:
            raise MalformedDag(f"{what}: field {field} is not dag-pb")
    return links, data


def decode_file_node(block: bytes, what: str = "dag-pb block") -> FileNode:
    """A dag-pb block as a UnixFS File (or Raw) node, its sizes checked against each
    other: one blocksize per link, and filesize (when set) = data + blocksizes."""
    links, data = decode_pb(block, what)
    if data is None:
        raise MalformedDag(f"{what} has no UnixFS Data: it is not a UnixFS file")
    kind: int | None = None
    inline, filesize, blocksizes = b"", None, []
    for field, value in _pb_fields(data, what):
        if field == 1 and isinstance(value, int):
            kind = value
        elif field == 2 and isinstance(value, bytes):
            inline = value
        elif field == 3 and isinstance(value, int):
            filesize = value
        elif field == 4 and isinstance(value, int):
            blocksizes.append(value)
        elif field == 4 and isinstance(value, bytes):  # packed, which protobuf readers accept too
            pos = 0
            while pos < len(value):
                size, pos = _pb_varint(value, pos, what)
                blocksizes.append(size)
    if kind not in (UNIXFS_RAW, UNIXFS_FILE):
        name = "node without a type" if kind is None else _UNIXFS_TYPES.get(kind, f"type {kind}") + " node"
        raise MalformedDag(f"{what} is a UnixFS {name}, not a file")
    if len(blocksizes) != len(links):
        raise MalformedDag(f"{what} has {len(links)} links but {len(blocksizes)} blocksizes")
    node = FileNode(kind, inline, links, blocksizes, filesize)
    if filesize is not None and filesize != node.size:
        raise MalformedDag(f"{what} says filesize {filesize}, but its data and blocksizes add up to {node.size}")
    return node
