"""Data preparation for Filecoin deals: whole objects packed into one CARv1 file (a piece)
up to a target piece size, its piece CID (CommP) computed while the CAR is written.

A piece's CAR holds each object's UnixFS DAG exactly as the IPFS backend builds it (the
CIDs the catalog holds: 256 KiB raw leaves, balanced dag-pb), so a provider that serves
the piece over trustless retrieval serves every object by its own CID. The header lists
every object's root. Bytes stream from each source through the CID hasher (which checks
the object's CID at its end) into the file and the piece hasher at once: memory stays at
one chunk plus the hashers' few pending nodes, whatever the piece's size.

Which objects go together is decided before writing (the header comes first), from
sizes: `car_bound(size)` is an upper bound of an object's bytes in a CAR, so a plan that
fits `capacity(target)` never makes a piece larger than the target.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ferry.errors import ChecksumMismatch, InvalidRequest
from workers.car import cid_bytes, header, section
from workers.cid import CHUNK, MAX_LINKS, ContentHasher
from workers.commp import MIN_PAYLOAD, Piece, PieceHasher

# A section's framing: varint length (<= 5 bytes for blocks up to 2 GiB) + a CIDv1 sha2-256
# (36 bytes). A dag-pb parent of n links: per link <= 2 + 38 (hash) + 2 + 11 (Tsize) bytes,
# plus the UnixFS data (type, filesize, n blocksizes of <= 11 bytes) and framing.
_SECTION = 5 + 36
_LINK = 64
_PARENT = 64


def car_bound(size: int) -> int:
    """An upper bound of the bytes an object of `size` bytes takes in a CAR (its blocks
    with their framing), so packing by it never overflows a piece."""
    leaves = max(1, -(-size // CHUNK))
    total = size + leaves * _SECTION
    nodes = leaves
    while nodes > 1:
        parents = -(-nodes // MAX_LINKS)
        total += parents * (_SECTION + _PARENT) + nodes * _LINK
        nodes = parents
    return total


def capacity(padded_size: int) -> int:
    """Payload bytes (the CAR) a piece of `padded_size` can hold: fr32 takes 1 bit in 128."""
    if padded_size < 128 or padded_size & (padded_size - 1):
        raise InvalidRequest(f"piece size {padded_size} is not a power of two of at least 128 bytes")
    return padded_size // 128 * 127


@dataclass(frozen=True, slots=True)
class Entry:
    """An object to pack: what it must hash to, and how big it is."""

    cid: str
    size: int
    ref: object = None  # the caller's handle (an item, an object id), passed through


def plan(entries: Iterable[Entry], padded_size: int) -> tuple[list[list[Entry]], list[Entry]]:
    """Group entries into pieces of at most `padded_size`, in the order given (first fit
    into the open piece, else a new one). Returns (pieces, too_big): entries that cannot
    fit even alone."""
    room = capacity(padded_size)
    groups: list[list[Entry]] = []
    too_big: list[Entry] = []
    used = 0
    for entry in entries:
        need = car_bound(entry.size) + _ROOT
        if need + _HEADER > room:
            too_big.append(entry)
            continue
        if not groups or used + need > room:
            groups.append([])
            used = _HEADER
        groups[-1].append(entry)
        used += need
    return groups, too_big


# The header: per root, tag (2) + byte-string head (2) + identity prefix (1) + 36 CID bytes;
# once, the map, its keys, the version, the roots array's head and the length varint.
_ROOT = 41
_HEADER = 32


class PieceWriter:
    """Writes one piece's CAR to `path` (through a temporary file, renamed when done).

    `add(cid, chunks)` streams one object in (in the order of `roots`); `finish()` returns
    the Piece. A source whose bytes do not make its CID raises ChecksumMismatch from
    `add`; the writer must then be `abort()`ed: its header already names that root.
    """

    def __init__(self, path: Path, roots: list[str], fsync: bool = True):
        if not roots:
            raise ValueError("a piece holds at least one object")
        self.path = Path(path)
        self.roots = list(roots)
        self._tmp = self.path.with_name(f".{self.path.name}.part")
        self._fsync = fsync
        self._pieces = PieceHasher()
        self._next = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by finish/abort
        self._emit(header(*(cid_bytes(r) for r in self.roots)))

    @property
    def size(self) -> int:
        """CAR bytes written so far."""
        return self._pieces.payload_size

    def _emit(self, data: bytes) -> None:
        self._file.write(data)
        self._pieces.update(data)

    def add(self, cid: str, chunks: Iterable[bytes], progress: Callable[[int], None] | None = None) -> int:
        """Stream one object's DAG into the CAR; returns its size in bytes."""
        if self._next >= len(self.roots) or self.roots[self._next] != cid:
            raise ValueError(f"objects must be added in the order of the header's roots; got {cid}")
        self._next += 1
        pending: list[bytes] = []
        hasher = ContentHasher(on_block=lambda c, block: pending.append(section(c, block)))
        for chunk in chunks:
            hasher.update(chunk)
            if pending:
                self._emit(b"".join(pending))
                pending.clear()
            if progress is not None:
                progress(len(chunk))
        digest = hasher.digest()
        if pending:
            self._emit(b"".join(pending))
        if digest.cid != cid:
            raise ChecksumMismatch(f"the bytes read make CID {digest.cid}, not {cid}")
        return digest.size

    def finish(self) -> Piece:
        if self._next != len(self.roots):
            raise ValueError(f"{len(self.roots) - self._next} objects named in the header were not added")
        if self.size < MIN_PAYLOAD:  # cannot happen: a header alone is longer; kept as a guard
            raise ValueError("a piece is at least 65 bytes")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return self._pieces.digest()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is not None:
            self.abort()
