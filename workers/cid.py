"""Streaming content addressing: size, sha256 and IPFS CIDv1 in one pass over the bytes.

Ferry moves objects between IPFS, S3, Filecoin and disks, and must name them the same
way wherever they live. While a transfer streams bytes through, a `ContentHasher`
computes, without ever holding the object in memory:

* the sha256 of the whole content (hex), which S3 and disk peers can check;
* the CIDv1 that `ipfs add --cid-version 1 --raw-leaves` gives for the same bytes with
  Kubo's other defaults (fixed 256 KiB chunks, balanced DAG of at most 174 links per
  node), so an IPFS peer's answer can be checked without re-adding the object there;
* the size.

The DAG rules mirror the JS reference importer, ipfs-unixfs-importer, that the test
vectors come from (no Kubo binary was at hand to check against directly). Content of at
most one chunk is a single raw block whose CID is the file's CID. Longer content is cut
into raw leaves; the balanced layout groups every run of `max_links` nodes of one level
under a dag-pb parent carrying UnixFS File data, and repeats on the parents until one
node remains. A trailing run of a single node still gets its own parent; only a
one-chunk file reduces to the leaf itself.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 262144
MAX_LINKS = 174

# CIDv1 prefixes: version 1, codec (raw 0x55 or dag-pb 0x70), multihash sha2-256 of 32 bytes.
_RAW_PREFIX = b"\x01\x55\x12\x20"
_DAG_PB_PREFIX = b"\x01\x70\x12\x20"
# UnixFS Data field 1 (Type) = 2 (File). No field 2 (Data): raw leaves hold all content.
_UNIXFS_FILE_TYPE = b"\x08\x02"
# PBLink field 2 (Name) with an empty string: the reference encodes Name "" explicitly,
# and leaving it out would change every parent's bytes and so its CID.
_EMPTY_NAME = b"\x12\x00"


@dataclass(frozen=True, slots=True)
class Digest:
    """What content addressing says about one object."""

    size: int
    sha256: str  # hex
    cid: str  # CIDv1 base32, "bafkrei..." for one raw block, "bafybei..." for dag-pb


@dataclass(frozen=True, slots=True)
class _Node:
    """One finished DAG node, as its parent needs to link to it."""

    cid: bytes  # binary CID
    tsize: int  # PBLink Tsize: encoded block size plus all its descendants' blocks
    filesize: int  # content bytes below it: the parent's UnixFS blocksizes entry


def _varint(n: int) -> bytes:
    """Unsigned LEB128, the protobuf varint (kept by hand to avoid a protobuf dependency)."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _cid_string(cid: bytes) -> str:
    """Multibase base32 lower-case, no padding: the "b..." form Kubo prints for CIDv1."""
    return "b" + base64.b32encode(cid).decode("ascii").lower().rstrip("=")


def _raw_leaf(block: bytes | memoryview) -> _Node:
    n = len(block)
    return _Node(_RAW_PREFIX + hashlib.sha256(block).digest(), n, n)


def _parent(children: list[_Node]) -> tuple[_Node, bytes]:
    """Encode a dag-pb node linking `children` in canonical dag-pb form.

    Serialized field order is Links (field 2, each a PBLink of Hash=1, Name=2, Tsize=3)
    before Data (field 1), byte for byte as @ipld/dag-pb writes it. UnixFS
    blocksizes (field 4) are repeated, not packed, as the proto2 schema declares them.
    """
    parts = []
    filesize = 0
    tsize = 0
    blocksizes = []
    for child in children:
        link = b"\x0a" + _varint(len(child.cid)) + child.cid + _EMPTY_NAME
        link += b"\x18" + _varint(child.tsize)
        parts.append(b"\x12" + _varint(len(link)) + link)
        blocksizes.append(b"\x20" + _varint(child.filesize))
        filesize += child.filesize
        tsize += child.tsize
    data = _UNIXFS_FILE_TYPE + b"\x18" + _varint(filesize) + b"".join(blocksizes)
    parts.append(b"\x0a" + _varint(len(data)) + data)
    block = b"".join(parts)
    return _Node(_DAG_PB_PREFIX + hashlib.sha256(block).digest(), len(block) + tsize, filesize), block


class ContentHasher:
    """Feed bytes in any-sized pieces with update(); call digest() once at the end.

    Memory stays bounded whatever the content size: one partial chunk plus, per tree
    level, at most `max_links` pending links. `chunk_size` and `max_links` default to
    Kubo's; other values exist so deep trees can be tested with small inputs.
    """

    def __init__(self, *, chunk_size: int = CHUNK, max_links: int = MAX_LINKS,
                 on_block: Callable[[bytes, bytes], None] | None = None) -> None:
        """`on_block(cid, block)` receives every block of the DAG as it is finished
        (leaves in order, each parent after its children): what a CAR writer needs."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if max_links < 2:
            # With one link per node every level would produce another level forever.
            raise ValueError("max_links must be at least 2")
        self._chunk_size = chunk_size
        self._max_links = max_links
        self._sha = hashlib.sha256()
        self._size = 0
        self._partial = bytearray()
        # _levels[0] holds leaves, _levels[k] nodes of height k not yet given a parent.
        self._levels: list[list[_Node]] = [[]]
        self._digest: Digest | None = None
        self._on_block = on_block

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._digest is not None:
            raise RuntimeError("update() after digest()")
        view = memoryview(data).cast("B")
        n = len(view)
        if not n:
            return
        self._sha.update(view)
        self._size += n
        chunk = self._chunk_size
        pos = 0
        if self._partial:
            # Top up the pending chunk first; it is the only copy made of the content.
            take = min(chunk - len(self._partial), n)
            self._partial += view[:take]
            pos = take
            if len(self._partial) < chunk:
                return
            self._push(0, self._leaf(self._partial))
            self._partial.clear()
        # Whole chunks inside the piece are hashed in place through memoryview slices.
        while n - pos >= chunk:
            self._push(0, self._leaf(view[pos : pos + chunk]))
            pos += chunk
        if pos < n:
            self._partial += view[pos:]

    @property
    def size(self) -> int:
        """Bytes fed so far (read by a progress reporter on another thread)."""
        return self._size

    def digest(self) -> Digest:
        """Finish the DAG and return the result; later calls return the same Digest."""
        if self._digest is None:
            if self._partial or self._size == 0:
                # The empty file is one empty raw block, as in the reference importer.
                self._push(0, self._leaf(bytes(self._partial)))
                self._partial.clear()
            root = self._finish()
            self._digest = Digest(self._size, self._sha.hexdigest(), _cid_string(root.cid))
        return self._digest

    def _leaf(self, block: bytes | bytearray | memoryview) -> _Node:
        node = _raw_leaf(block)
        if self._on_block is not None:
            self._on_block(node.cid, bytes(block))
        return node

    def _parent(self, children: list[_Node]) -> _Node:
        node, block = _parent(children)
        if self._on_block is not None:
            self._on_block(node.cid, block)
        return node

    def _push(self, height: int, node: _Node) -> None:
        # A full run of max_links is closed at once: the balanced layout groups each level
        # into consecutive runs of max_links, so a full run's parent never changes.
        while True:
            if height == len(self._levels):
                self._levels.append([])
            level = self._levels[height]
            level.append(node)
            if len(level) < self._max_links:
                return
            node = self._parent(level)
            level.clear()
            height += 1

    def _finish(self) -> _Node:
        # Close the trailing partial runs from the bottom up. The root is the single node
        # left on the highest level; a lone leaf is the root only when nothing else exists.
        height = 0
        while True:
            level = self._levels[height]
            if height == len(self._levels) - 1 and len(level) == 1:
                return level[0]
            if level:
                self._push(height + 1, self._parent(level))
                level.clear()
            height += 1


def digest_bytes(data: bytes) -> Digest:
    """Digest of content already in memory."""
    hasher = ContentHasher()
    hasher.update(data)
    return hasher.digest()


_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def normalize_cid(cid: str) -> str:
    """A CIDv1 in the base32 form Ferry stores ("b..."), from base32 or base58btc ("z...",
    what js-ipfs prints for CIDv1). CIDv0 ("Qm...") and other bases are refused."""
    if cid.startswith("b"):
        return cid.lower()
    if cid.startswith("z"):
        n = 0
        for ch in cid[1:]:
            digit = _BASE58.find(ch)
            if digit < 0:
                raise ValueError(f"{cid!r} is not base58btc")
            n = n * 58 + digit
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return _cid_string(raw)
    raise ValueError(f"{cid!r}: only CIDv1 in base32 (b...) or base58btc (z...) is understood")


_KNOWN_CODECS = {0x55: "raw", 0x70: "dag-pb"}


def check_cid(key: str) -> str:
    """The key of an object on a content-addressed backend: a CIDv1 of sha2-256 over a raw
    or dag-pb block, in base32 or base58btc. Returns it in Ferry's base32 form; anything
    else (a path, CIDv0, another hash or codec, bad characters) raises InvalidKey."""
    from ferry.errors import InvalidKey

    def refuse(why: str) -> InvalidKey:
        return InvalidKey(f"{key!r} is not a CID Ferry can hold here: {why}", field="key")

    if not isinstance(key, str) or not key:
        raise refuse("empty")
    if key.startswith("Qm"):
        raise refuse("CIDv0; Ferry names IPFS objects by CIDv1 (ipfs add --cid-version=1)")
    try:
        cid = normalize_cid(key)
        body = cid[1:].upper()
        if not body.isalnum() or len(body) > 200:
            raise ValueError("not base32")
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError as exc:  # binascii.Error is a ValueError
        raise refuse(str(exc)) from None
    if len(raw) != 36 or raw[0] != 1 or raw[1] not in _KNOWN_CODECS or raw[2:4] != b"\x12\x20":
        raise refuse("only CIDv1 of sha2-256 over raw or dag-pb blocks are understood")
    if _cid_string(raw) != cid:
        raise refuse("not in canonical form")
    return cid
