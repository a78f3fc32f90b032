"""Streaming copy and verification between two backends, hashing as bytes pass.

Memory stays bounded by one chunk in flight whatever the object size: bytes are read
from the source, fed to the hasher (sha256 + CID) and handed to the destination's
writer as they come.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from ferry.errors import ChecksumMismatch
from workers.base import Backend
from workers.cid import ContentHasher, Digest


def _hashed(chunks: Iterator[bytes], hasher: ContentHasher) -> Iterator[bytes]:
    for chunk in chunks:
        hasher.update(chunk)
        yield chunk


def copy(src: Backend, src_key: str, dst: Backend, dst_key: str, size: int | None = None,
         hasher: ContentHasher | None = None) -> Digest:
    """Copy one object; return the digest of the bytes read from the source.

    Pass a `hasher` to watch the bytes go by (`hasher.size`) from another thread.
    Raises KeyNotFound (source missing), ChecksumMismatch (source changed size while
    read), BackendUnavailable/BackendError from either side.
    """
    hasher = hasher or ContentHasher()
    written = dst.write(dst_key, _hashed(src.read(src_key), hasher), size=size)
    digest = hasher.digest()
    if written != digest.size:
        raise ChecksumMismatch(
            f"{dst.name}:{dst_key}: wrote {written} bytes but read {digest.size} from {src.name}:{src_key}"
        )
    return digest


def verify(backend: Backend, key: str, expected: Digest) -> None:
    """Re-read `key` in full and compare its sha256 and size with `expected`.

    Raises ChecksumMismatch if they differ, KeyNotFound if the object is gone.
    """
    sha = hashlib.sha256()
    size = 0
    for chunk in backend.read(key):
        sha.update(chunk)
        size += len(chunk)
    if (sha.hexdigest(), size) != (expected.sha256, expected.size):
        raise ChecksumMismatch(
            f"{backend.name}:{key}: read back sha256 {sha.hexdigest()} ({size} B), "
            f"expected {expected.sha256} ({expected.size} B)"
        )
