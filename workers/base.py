"""The one backend interface every storage driver implements.

A driver subclasses `Backend`, declares a pydantic `Config` for its settings, and
fills in the verbs below. Every verb streams: no verb holds a whole object in memory.

Errors each verb may raise (all from ferry.errors):
  KeyNotFound         the key does not exist (stat, read)
  InvalidKey          the key is malformed or escapes the backend's root (every verb)
  BackendUnavailable  the service cannot be reached; transient, retried
  BackendError        any other failure the driver can name
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ferry.errors import FerryError, InvalidKey

CHUNK_SIZE = 1024 * 1024
MAX_KEY_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class Capacity:
    """Space a backend reports: bytes used by its storage and the most it may use (None
    when it has no set limit)."""

    used: int
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class ObjectStat:
    """What a backend knows about one stored object without reading it."""

    key: str
    size: int
    mtime: float | None = None
    etag: str | None = None


class DriverConfig(BaseModel):
    """Base of every driver's settings schema: unknown settings are refused."""

    model_config = ConfigDict(extra="forbid")


def check_key(key: str) -> str:
    """Return `key` if it names an object inside a backend's root, else raise InvalidKey.

    Keys are relative, '/'-separated, with no empty, '.' or '..' segments and no NUL,
    so they mean the same thing on every backend and cannot escape a root.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey("key must be a non-empty string", field="key")
    if key.endswith("/"):
        raise InvalidKey(f"key {key!r} ends with '/': that is a prefix, not a key", field="key")
    _check_path(key)
    return key


def check_prefix(prefix: str) -> str:
    """Return `prefix` if it is '' or a relative path (ending in '/' or not) inside the root."""
    if prefix == "":
        return prefix
    _check_path(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _check_path(path: str) -> None:
    if len(path) > MAX_KEY_LENGTH:
        raise InvalidKey(f"key is longer than {MAX_KEY_LENGTH} characters", field="key")
    if "\x00" in path or "\\" in path:
        raise InvalidKey(f"key {path!r} contains a NUL or backslash", field="key")
    if path.startswith("/"):
        raise InvalidKey(f"key {path!r} is absolute; keys are relative to the backend root", field="key")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(
                f"key {path!r} has an empty, '.' or '..' segment; keys may not escape the backend root",
                field="key",
            )


class Backend(abc.ABC):
    """One configured storage instance.

    Instances are built by workers.registry from a BackendSpec; they are cheap to
    keep for the life of a worker process and safe to use from one thread at a time.
    """

    driver: ClassVar[str]
    Config: ClassVar[type[DriverConfig]] = DriverConfig
    # Content-addressed: an object's key is its CID (workers.cid), fixed by its bytes, so a
    # copy's destination key comes from the digest, not from the source's key. `write`
    # refuses bytes whose CID is not the key (ChecksumMismatch) and `list` yields CIDs.
    content_addressed: ClassVar[bool] = False
    # Read-only: a retrieval source Ferry does not control (a public gateway). `write` and
    # `delete` raise ReadOnlyBackend; nothing is ever placed there, and a migration from it
    # leaves it as it is.
    read_only: ClassVar[bool] = False

    def __init__(self, name: str, config: DriverConfig):
        self.name = name
        self.config = config

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectStat:
        """Size (and what else is cheap) of one object; KeyNotFound if absent."""

    @abc.abstractmethod
    def read(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Open `key` now (KeyNotFound if absent) and return an iterator over its bytes."""

    @abc.abstractmethod
    def write(self, key: str, chunks: Iterable[bytes], size: int | None = None) -> int:
        """Store the bytes of `chunks` at `key`, replacing what was there, atomically:
        readers see the old object or the whole new one, never a part. Returns bytes written.
        `size`, when known, lets a driver choose single-part or multipart upload."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove `key`. Returns False when it was already absent (deleting twice is safe)."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectStat]:
        """Every object whose key starts with `prefix`, in key order, streamed page by page."""

    @abc.abstractmethod
    def check(self) -> None:
        """Return if the backend answers as its protocol promises; else BackendUnavailable."""

    def add(self, chunks: Iterable[bytes], size: int | None = None,
            expect: str | Callable[[], str] | None = None) -> tuple[str, int]:
        """Content-addressed drivers only: store the bytes under the CID they make and
        return (CID, bytes). If `expect` (a CID, or a function called once every byte is
        sent) differs from that CID, raise ChecksumMismatch (or let `expect` raise) and
        keep nothing."""
        raise NotImplementedError(f"the {self.driver} driver is not content-addressed")

    def capacity(self) -> Capacity | None:
        """Space used and available, where the backend can say (None where it cannot)."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class ChunkReader(Iterator[bytes]):
    """The chunks of an open binary stream (a file, an HTTP body). It closes the stream
    when exhausted, closed, or dropped unread: a plain generator would leak it if never
    started. Read errors of the types in `errors` become FerryErrors via `translate`."""

    def __init__(self, stream: Any, chunk_size: int, translate: Callable[[Exception], FerryError],
                 errors: tuple[type[Exception], ...] = (OSError,)):
        self._stream = stream
        self._chunk_size = chunk_size
        self._translate = translate
        self._errors = errors

    def __iter__(self) -> ChunkReader:
        return self

    def __next__(self) -> bytes:
        if self._stream is None:
            raise StopIteration
        try:
            chunk = self._stream.read(self._chunk_size)
        except self._errors as exc:
            self.close()
            raise self._translate(exc) from exc
        if not chunk:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
