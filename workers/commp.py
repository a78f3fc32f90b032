"""Filecoin piece commitment (CommP) computed while bytes stream through.

A Filecoin deal names its data by the piece CID: the root of a binary sha256 Merkle tree
over the fr32-padded payload. `PieceHasher` computes it in one pass without holding the
data, so a CAR file being packed for a deal gets its piece CID as it is written.

The rules follow filecoin-project/go-fil-commp-hashhash (what Boost and most data
preparation tools use), whose published vectors the unit tests replay:

* fr32: every 127 payload bytes (1016 bits) become four 32-byte leaves of 254 data bits
  each, the bits taken little-endian, the two top bits of each leaf's last byte zero.
* Nodes: parent = sha256(left || right) with the two top bits of byte 31 cleared
  (the "sha2-256-trunc254-padded" hash), so every node is a valid BLS12-381 field element.
* Size: the payload is zero-filled to whole 127-byte quanta, and the tree to the next power
  of two; `padded_size` = 128 x quanta rounded up to a power of two (128 at least), which
  is the padded piece size Lotus/Boost report. Zero subtrees are never hashed: their roots
  are the precomputed `zero_commitment(level)`.
* Small input: like go-fil-commp-hashhash, fewer than 65 bytes is refused (`PieceTooSmall`);
  the v2 piece CID also needs 127 bytes (go-fil-commcid refuses less), else it is None.

Memory is one pending node per tree level (at most ~35 for a 1 TiB piece) plus fewer than
127 carried bytes: flat whatever the piece size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from workers.cid import _cid_string, _varint

QUANTUM = 127  # payload bytes per four fr32 leaves
MIN_PAYLOAD = 65  # go-fil-commp-hashhash MinPiecePayload
MIN_PAYLOAD_V2 = 127  # go-fil-commcid DataCommitmentToPieceCidv2 minimum
MAX_LEVELS = 64

# CIDv1 prefixes. v1: codec fil-commitment-unsealed (0xf101), multihash
# sha2-256-trunc254-padded (0x1012) of 32 bytes. v2 (FRC-0069): codec raw (0x55),
# multihash fr32-sha256-trunc254-padbintree (0x1011); its length depends on the padding.
_V1_PREFIX = b"\x01\x81\xe2\x03\x92\x20\x20"
_V2_PREFIX = b"\x01\x55\x91\x20"

_LEAF_MASK = (1 << 254) - 1
# _TRUNC[b] is the byte b with its two top bits cleared, ready to append.
_TRUNC = tuple(bytes([b & 0x3F]) for b in range(256))
_sha256 = hashlib.sha256


class PieceTooSmall(ValueError):
    """Raised when fewer than MIN_PAYLOAD bytes were fed before digest()."""


@dataclass(frozen=True, slots=True)
class Piece:
    """The piece a payload becomes on Filecoin."""

    cid: str  # v1 piece CID, "baga6ea4seaq...", as Lotus/Boost deals name pieces
    commitment: str  # the raw 32-byte CommP, hex
    payload_size: int  # bytes fed
    padded_size: int  # padded piece size: power of two >= 128
    cid_v2: str | None  # FRC-0069 piece CID "bafkzcib...", None under 127 payload bytes


def _node(left: bytes, right: bytes) -> bytes:
    d = _sha256(left + right).digest()
    return d[:31] + _TRUNC[d[31]]


def _zero_commitments() -> tuple[bytes, ...]:
    levels = [bytes(32)]
    for _ in range(MAX_LEVELS - 1):
        levels.append(_node(levels[-1], levels[-1]))
    return tuple(levels)


_ZERO = _zero_commitments()


def zero_commitment(level: int) -> bytes:
    """Root of an all-zero subtree `level` levels above the 32-byte leaves (32 << level bytes)."""
    return _ZERO[level]


def padded_piece_size(payload_size: int) -> int:
    """Padded piece size for `payload_size` bytes: 128 x quanta, rounded up to a power of two."""
    quanta = max(1, -(-payload_size // QUANTUM))
    return 1 << (quanta * 128 - 1).bit_length()


class PieceHasher:
    """Feed bytes with update(); digest() gives the Piece. Reusable after reset()."""

    __slots__ = ("_carry", "_size", "_stack")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._carry = b""  # < QUANTUM bytes waiting for the rest of their quantum
        self._size = 0
        # _stack[i]: a finished left node at level i + 2 (one quantum = 4 leaves = level 2)
        # still waiting for its right sibling; None when there is none.
        self._stack: list[bytes | None] = []

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        if not n:
            return
        self._size += n
        start = 0
        if self._carry:
            need = QUANTUM - len(self._carry)
            if n < need:
                self._carry += bytes(view)
                return
            self._quanta(self._carry + bytes(view[:need]), QUANTUM)
            self._carry = b""
            start = need
        end = start + (n - start) // QUANTUM * QUANTUM
        if end > start:
            self._quanta(view[start:end], end - start)
        if end < n:
            self._carry = bytes(view[end:])

    def _quanta(self, buf: bytes | memoryview, length: int) -> None:
        """Hash whole 127-byte quanta: the hot loop, so everything is a local name."""
        from_bytes = int.from_bytes
        sha = _sha256
        trunc = _TRUNC
        mask = _LEAF_MASK
        stack = self._stack
        for off in range(0, length, QUANTUM):
            x = from_bytes(buf[off : off + QUANTUM], "little")
            # fr32: the four 254-bit leaves, each widened to 256 bits, as one 128-byte run.
            b = (
                (x & mask)
                | ((x >> 254) & mask) << 256
                | ((x >> 508) & mask) << 512
                | (x >> 762) << 768
            ).to_bytes(128, "little")
            d = sha(b[:64]).digest()
            left = d[:31] + trunc[d[31]]
            d = sha(b[64:]).digest()
            d = sha(left + d[:31] + trunc[d[31]]).digest()
            node = d[:31] + trunc[d[31]]
            level = 0
            while level < len(stack) and stack[level] is not None:
                d = sha(stack[level] + node).digest()
                node = d[:31] + trunc[d[31]]
                stack[level] = None
                level += 1
            if level == len(stack):
                stack.append(node)
            else:
                stack[level] = node

    @property
    def payload_size(self) -> int:
        return self._size

    def digest(self) -> Piece:
        """The piece for everything fed so far. Does not reset: more updates continue it."""
        size = self._size
        if size < MIN_PAYLOAD:
            raise PieceTooSmall(f"{size} bytes: a piece needs at least {MIN_PAYLOAD}")
        padded = padded_piece_size(size)
        height = padded.bit_length() - 1 - 5  # levels above the 32-byte leaves
        stack = list(self._stack)
        if self._carry:
            tail = PieceHasher()
            tail._quanta(self._carry.ljust(QUANTUM, b"\0"), QUANTUM)
            right: bytes | None = tail._stack[0]
        else:
            right = None
        # Fold the pending left nodes from the bottom up; `right` is the partial subtree at
        # the current level, completed with zero subtrees where the payload ran out.
        for i in range(height - 2):
            left = stack[i] if i < len(stack) else None
            if left is not None:
                right = _node(left, right if right is not None else _ZERO[i + 2])
            elif right is not None:
                right = _node(right, _ZERO[i + 2])
        root = right if right is not None else stack[height - 2]
        return Piece(
            cid=_cid_string(_V1_PREFIX + root),
            commitment=root.hex(),
            payload_size=size,
            padded_size=padded,
            cid_v2=_cid_v2(root, size, padded, height) if size >= MIN_PAYLOAD_V2 else None,
        )


def _cid_v2(root: bytes, size: int, padded: int, height: int) -> str:
    """FRC-0069: digest = uvarint(padding) || height || root, padding = unpadded tree - payload."""
    digest = _varint(padded // 128 * 127 - size) + bytes([height]) + root
    return _cid_string(_V2_PREFIX + _varint(len(digest)) + digest)


def piece_of_bytes(data: bytes | bytearray | memoryview) -> Piece:
    """The piece of an in-memory payload (tests, small objects)."""
    hasher = PieceHasher()
    hasher.update(data)
    return hasher.digest()
