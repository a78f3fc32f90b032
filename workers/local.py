"""The "local" driver: objects are files under one directory on a local (or mounted) disk.

A key maps to the file `root/<key>`, its '/'-separated segments becoming directories.
Writes go to a hidden temporary file in the target's directory and are renamed into
place, so a reader sees the old file or the whole new one. Temporary files are named
`.ferry-tmp-<random>`: list() skips them and keys may not use that name.

Settings:
  root   directory holding the objects; created (with its parents) if missing
  fsync  fsync each file, and its directory after the rename, before write() returns

Keys are checked by `check_key`, and then the real path (symlinks resolved) must still be
inside root: a symlink in the tree that points outside is refused with InvalidKey, and
list() does not follow symlinks at all.

Unlike S3, a file system cannot hold both "a" and "a/b": whichever is written second
fails with BackendError. A directory is never an object (stat/read: KeyNotFound).
New files get mkstemp's mode 0600: objects are readable by the worker's user only.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import ClassVar

from ferry.errors import (
    BackendError,
    BackendUnavailable,
    FerryError,
    InvalidKey,
    KeyNotFound,
)
from workers.base import (
    CHUNK_SIZE,
    Backend,
    ChunkReader,
    DriverConfig,
    ObjectStat,
    check_key,
    check_prefix,
)

TMP_PREFIX = ".ferry-tmp-"


class LocalConfig(DriverConfig):
    root: Path
    fsync: bool = False


class LocalBackend(Backend):
    """Objects as files under `config.root`."""

    driver: ClassVar[str] = "local"
    Config: ClassVar[type[DriverConfig]] = LocalConfig
    config: LocalConfig

    def __init__(self, name: str, config: LocalConfig):
        super().__init__(name, config)
        root = config.root.expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            # Building a backend must not fail on a bad disk: check() reports it, and
            # every verb fails with a clear error until it is fixed.
            pass
        # Resolved once, so the containment test below compares real paths to a real path.
        self.root = os.path.realpath(root)
        self._root_slash = self.root.rstrip(os.sep) + os.sep
        self._dirs: dict[str, bool] = {}

    # -- keys and paths -------------------------------------------------------------

    def _path(self, key: str) -> str:
        """The file for `key`, after checking it cannot leave root (InvalidKey)."""
        check_key(key)
        segments = key.split("/")
        if any(segment.startswith(TMP_PREFIX) for segment in segments):
            raise InvalidKey(f"key {key!r}: names starting with {TMP_PREFIX!r} are reserved", field="key")
        path = os.path.join(self.root, *segments)
        parent = os.path.dirname(path)
        # Symlinks must not lead out of root. Resolving every component of every path
        # costs ~7 lstat calls; directories are resolved once (cached), the file itself
        # each time.
        inside = self._inside(parent) if parent != self.root else True
        if inside and os.path.islink(path):
            inside = os.path.realpath(path).startswith(self._root_slash)
        if not inside:
            raise InvalidKey(f"key {key!r} leads outside the root of backend {self.name!r}", field="key")
        return path

    def _inside(self, directory: str) -> bool:
        known = self._dirs.get(directory)
        if known is None:
            real = os.path.realpath(directory)
            known = real == self.root or real.startswith(self._root_slash)
            if os.path.isdir(real):  # cache only what exists: a missing dir may appear as a link
                if len(self._dirs) > 65536:
                    self._dirs.clear()
                self._dirs[directory] = known
        return known

    def _os_error(self, exc: OSError, key: str, doing: str) -> FerryError:
        if exc.errno == errno.ENAMETOOLONG:
            return InvalidKey(f"key {key!r} is too long for this file system", field="key")
        if not os.path.isdir(self.root):
            return BackendUnavailable(f"backend {self.name!r}: root {self.root} is gone ({doing} {key!r}: {exc})")
        return BackendError(f"backend {self.name!r}: cannot {doing} {key!r}: {exc}")

    # -- verbs ----------------------------------------------------------------------

    def stat(self, key: str) -> ObjectStat:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyNotFound(f"key {key!r} not found on backend {self.name!r}") from None
        except OSError as exc:
            raise self._os_error(exc, key, "stat") from exc
        if not stat_mod.S_ISREG(st.st_mode):
            # A directory is a prefix here, never an object.
            raise KeyNotFound(f"key {key!r} not found on backend {self.name!r}")
        return ObjectStat(key=key, size=st.st_size, mtime=st.st_mtime)

    def read(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        path = self._path(key)
        try:
            # Unbuffered: read(n) of a regular file returns n bytes until the end, and
            # each chunk is its own bytes object with no second copy through a buffer.
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by ChunkReader
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise KeyNotFound(f"key {key!r} not found on backend {self.name!r}") from None
        except OSError as exc:
            raise self._os_error(exc, key, "read") from exc
        try:
            regular = stat_mod.S_ISREG(os.fstat(f.fileno()).st_mode)
        except BaseException:
            f.close()
            raise
        if not regular:
            f.close()
            raise KeyNotFound(f"key {key!r} not found on backend {self.name!r}")
        return ChunkReader(f, chunk_size, lambda exc: self._os_error(exc, key, "read"))

    def write(self, key: str, chunks: Iterable[bytes], size: int | None = None) -> int:
        path = self._path(key)
        fd, tmp = self._temp_file(key, os.path.dirname(path))
        written = 0
        try:
            with os.fdopen(fd, "wb") as f:
                # Errors of the caller's iterator propagate as they are: they are not
                # this backend's failure. Only our own file operations are translated.
                for chunk in chunks:
                    written += len(chunk)
                    if size is not None and written > size:
                        raise BackendError(f"write {key!r}: more than the announced {size} bytes")
                    try:
                        f.write(chunk)
                    except OSError as exc:
                        raise self._os_error(exc, key, "write") from exc
                if size is not None and written != size:
                    raise BackendError(f"write {key!r}: got {written} bytes, {size} were announced")
                try:
                    f.flush()
                    if self.config.fsync:
                        os.fsync(f.fileno())
                except OSError as exc:
                    raise self._os_error(exc, key, "write") from exc
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise self._os_error(exc, key, "write") from exc
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if self.config.fsync:
            # The rename is durable only once the directory entry is on disk too.
            self._fsync_dir(os.path.dirname(path))
        return written

    def _temp_file(self, key: str, directory: str) -> tuple[int, str]:
        if not os.path.isdir(self.root):
            # Do not recreate a vanished root (an unmounted disk) under its mount point.
            raise BackendUnavailable(f"backend {self.name!r}: root {self.root} is not a directory")
        # A concurrent delete() prunes empty directories, and may remove ours between
        # makedirs and mkstemp: try again a few times before calling it an error.
        for attempt in range(3):
            try:
                os.makedirs(directory, exist_ok=True)
                return tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
            except FileNotFoundError as exc:
                if attempt == 2:
                    raise self._os_error(exc, key, "write") from exc
            except OSError as exc:
                raise self._os_error(exc, key, "write") from exc
        raise AssertionError("unreachable")

    def _fsync_dir(self, directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        except OSError as exc:
            if os.path.isdir(path):  # some systems answer EPERM for unlink(dir)
                return False
            raise self._os_error(exc, key, "delete") from exc
        # Drop directories the delete left empty, so the tree does not fill with them;
        # stop at the first one still in use (rmdir refuses non-empty directories).
        parent = os.path.dirname(path)
        while parent != self.root and parent.startswith(self._root_slash):
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectStat]:
        check_prefix(prefix)  # now, not at the first next()
        # A prefix is a string prefix, as on S3: "a/b" matches "a/b.txt" and "a/bc/d".
        # So walk the directory named by the part before the last '/', keeping the
        # entries whose name starts with the rest.
        directory, _, name_prefix = prefix.rpartition("/")
        return self._walk(directory, name_prefix)

    def _walk(self, directory: str, name_prefix: str) -> Iterator[ObjectStat]:
        top = os.path.join(self.root, *directory.split("/")) if directory else self.root
        if os.path.realpath(top) != top:
            return  # under a symlink: the full walk does not follow it either
        base = directory + "/" if directory else ""
        # One sorted listing per open directory on the stack: memory is bounded by the
        # directories on the current path, not by the size of the tree.
        stack = [(base, iter(self._entries(top, name_prefix)))]
        while stack:
            base, entries = stack[-1]
            for name, path, is_dir, st in entries:
                if is_dir:
                    stack.append((base + name + "/", iter(self._entries(path, ""))))
                    break
                yield ObjectStat(key=base + name, size=st.st_size, mtime=st.st_mtime)
            else:
                stack.pop()

    def _entries(self, directory: str, name_prefix: str) -> list[tuple[str, str, bool, os.stat_result | None]]:
        """The objects and subdirectories of `directory`, sorted so the walk yields keys
        in key order: a directory sorts as "name/", since all its keys start so."""
        found = []
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    name = entry.name
                    if not name.startswith(name_prefix) or name.startswith(TMP_PREFIX) or "\\" in name:
                        continue  # not asked for, a write in progress, or not a valid key
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            found.append((name + "/", name, entry.path, True, None))
                        elif entry.is_file(follow_symlinks=False):
                            found.append((name, name, entry.path, False, entry.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue  # deleted while we looked
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise self._os_error(exc, directory, "list") from exc
        found.sort(key=lambda item: item[0])
        return [item[1:] for item in found]

    def check(self) -> None:
        if not os.path.isdir(self.root):
            what = "does not exist" if not os.path.exists(self.root) else "is not a directory"
            raise BackendUnavailable(f"backend {self.name!r}: root {self.root} {what}")
        # Really create a file: os.access() says nothing of a full or read-only disk.
        try:
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self.root)
            os.close(fd)
            os.unlink(tmp)
        except OSError as exc:
            raise BackendUnavailable(f"backend {self.name!r}: root {self.root} is not writable: {exc}") from exc
