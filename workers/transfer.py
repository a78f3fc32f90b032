"""Streaming copy and verification between two backends, hashing as bytes pass.

Memory stays bounded by one chunk in flight whatever the object size: bytes are read
from the source, fed to the hasher (sha256 + CID) and handed to the destination's
writer as they come.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

from ferry.errors import ChecksumMismatch
from workers.base import Backend
from workers.cid import ContentHasher, Digest, check_cid


def _hashed(chunks: Iterator[bytes], hasher: ContentHasher) -> Iterator[bytes]:
    for chunk in chunks:
        hasher.update(chunk)
        yield chunk


class ContentDiffers(ChecksumMismatch):
    """The bytes read make another CID than the one expected (nothing was stored);
    `digest` is what they do make."""

    def __init__(self, message: str, digest: Digest):
        super().__init__(message)
        self.digest = digest


def copy(src: Backend, src_key: str, dst: Backend, dst_key: str, size: int | None = None,
         hasher: ContentHasher | None = None, expect_cid: str | None = None) -> Digest:
    """Copy one object; return the digest of the bytes read from the source.

    On a content-addressed destination the object is stored under its CID (`digest.cid`),
    whatever `dst_key` says; the CID the bytes must make (`expect_cid`, else a
    content-addressed source's key, else a non-empty `dst_key`) is checked before the
    destination keeps anything (ContentDiffers).

    Pass a `hasher` to watch the bytes go by (`hasher.size`) from another thread.
    Raises KeyNotFound (source missing), ChecksumMismatch (source changed size while
    read, or a content-addressed peer made another CID), BackendUnavailable/BackendError
    from either side.
    """
    hasher = hasher or ContentHasher()
    chunks = _hashed(src.read(src_key), hasher)
    want = expect_cid or (src_key if src.content_addressed else None) or (dst_key if dst.content_addressed else None)
    if want and (src.content_addressed or dst.content_addressed):
        want = check_cid(want)

    def expected() -> str:
        digest = hasher.digest()
        if want and digest.cid != want:
            raise ContentDiffers(f"{src.name}:{src_key}: the bytes read make CID {digest.cid}, expected {want}",
                                 digest)
        return digest.cid

    if dst.content_addressed:
        _, written = dst.add(chunks, size=size, expect=expected)
    else:
        written = dst.write(dst_key, chunks, size=size)
        if src.content_addressed:
            expected()  # a keyed copy of lying bytes is removed by the caller
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


def check(backend: Backend, key: str, expected_sha256: str, expected_size: int) -> tuple[bool, int]:
    """Scrub: re-read `key` in full, streaming, and compare with the expected sha256 and
    size. Returns (matches, bytes read). Raises KeyNotFound if nothing is at the key.

    Only sha256 is computed (the CID follows from the same bytes): this is the loop whose
    speed bench/reconcile.py compares with sha256sum.
    """
    sha = hashlib.sha256()
    size = 0
    for chunk in backend.read(key):
        sha.update(chunk)
        size += len(chunk)
    return (size == expected_size and sha.hexdigest() == expected_sha256), size


def verified_stream(backend: Backend, key: str, expected_sha256: str, expected_size: int,
                    on_mismatch: Callable[[str], None]) -> Iterator[bytes]:
    """The bytes at `key`, hashed as they stream. The last chunk is held back until the
    whole object is hashed: if it does not match, `on_mismatch(reason)` is called and
    ChecksumMismatch raised instead, so a reader never receives a complete corrupt object."""
    sha = hashlib.sha256()
    size = 0
    held: bytes | None = None
    for chunk in backend.read(key):
        sha.update(chunk)
        size += len(chunk)
        if held is not None:
            yield held
        held = chunk
    if size != expected_size or sha.hexdigest() != expected_sha256:
        reason = f"read sha256 {sha.hexdigest()} ({size} B), expected {expected_sha256} ({expected_size} B)"
        on_mismatch(reason)
        raise ChecksumMismatch(f"{backend.name}:{key}: {reason}")
    if held is not None:
        yield held
