"""The "huggingface" driver: objects as files of a dataset or model repo on the Hugging Face Hub.

A key maps to the file `<prefix><key>` of `repo_id` on the branch `revision`, through the
`huggingface_hub` library (HfApi against `endpoint`). Every write and every delete is one
commit, which the Hub applies whole: readers see the old tree or the new one, never a part.

Settings:
  repo_id          the repository, "namespace/name"
  repo_type        "dataset" (default) or "model"
  endpoint         the Hub (default https://huggingface.co; a mirror or a Hub-compatible server)
  token            an access token: `{env: NAME}` or `{file: PATH}`. Without one the driver
                   sends none (it never falls back to the machine's HF_TOKEN or cached login),
                   which reads public repos only
  revision         the branch commits go to, and reads come from (default "main")
  pinned_revision  a commit sha (40 hex digits): a read-only view of the repo as it was at
                   that commit; writes and deletes raise ReadOnlyBackend
  prefix           a folder inside the repo, e.g. "ferry/" ('' = the repo's root)
  timeout          seconds for each HTTP exchange with the Hub (default 60)
  create_repo      create the repo on first use if it does not exist
  private          whether a repo made by create_repo is private (default true)

Writes spool the incoming chunks to a temporary file (memory stays at about one chunk
whatever the size; the temporary directory needs room for one object), check the count
against the announced size, then commit the file: the library asks the Hub's `preupload`
whether it is a regular git file (sent base64 inside the commit, for small text) or an LFS
file (uploaded first through the git-lfs batch API, then referenced by the commit). Reads
stream the file's `resolve` URL (following the Hub's redirect to its CDN). Listing reads
the repo's recursive tree and sorts it, since the Hub promises no order: it holds one
entry (path, size, hash) per file under the listed folder.

Keys are Ferry keys (workers.base.check_key). Reserved, so a key cannot change how the
repo itself behaves: any '.git' or '.cache' segment (the library refuses them), files named
'.gitattributes' or '.gitignore' (git's own configuration: what is stored with LFS, what
is ignored) and the root README.md (the repo card the Hub parses). Listing skips them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, ClassVar, Literal

import httpx
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_url
from huggingface_hub.errors import (
    DisabledRepoError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import (
    build_hf_headers,
    disable_progress_bars,
    hf_raise_for_status,
    set_client_factory,
)
from huggingface_hub.utils._http import hf_request_event_hook
from pydantic import Field, SecretStr, field_validator

from ferry.errors import (
    BackendError,
    BackendUnavailable,
    FerryError,
    InvalidKey,
    KeyNotFound,
    ReadOnlyBackend,
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

log = logging.getLogger(__name__)

REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
COMMIT_SHA = r"^[0-9a-f]{40}$"
_RESERVED_SEGMENTS = {".git", ".cache"}
_RESERVED_NAMES = {".gitattributes", ".gitignore"}
_RESERVED_PATHS = {"README.md"}


# -- the library's HTTP client ----------------------------------------------------------
#
# huggingface_hub sends every request through one process-wide httpx client, which its
# default factory builds without a timeout: a Hub that stops answering would hold a worker
# for ever. Ours is that same client (the library's request hook, redirects followed) with
# a timeout: the calling backend's own, set around each of its calls in a context variable
# (threads do not share it), else DEFAULT_TIMEOUT. It also passes a raw request body given
# as `data=` (the library hands an LFS upload its file that way) as `content=`, which is
# what httpx does with it anyway, without the DeprecationWarning httpx 0.28 raises for it.
# Progress bars are off: a worker has no terminal to draw them on.

DEFAULT_TIMEOUT = 60.0
_call_timeout: ContextVar[float | None] = ContextVar("ferry_huggingface_timeout", default=None)


class _HubClient(httpx.Client):
    def build_request(self, method: str, url: Any, *, content: Any = None, data: Any = None,
                      **kwargs: Any) -> httpx.Request:
        if data is not None and content is None and not isinstance(data, Mapping):
            content, data = data, None
        timeout = _call_timeout.get()
        if timeout is not None:
            kwargs["timeout"] = timeout
        return super().build_request(method, url, content=content, data=data, **kwargs)


def _client_factory() -> httpx.Client:
    return _HubClient(event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True,
                      timeout=DEFAULT_TIMEOUT)


set_client_factory(_client_factory)
disable_progress_bars()


class HuggingFaceConfig(DriverConfig):
    repo_id: str = Field(pattern=REPO_ID)
    repo_type: Literal["dataset", "model"] = "dataset"
    endpoint: str = "https://huggingface.co"
    # SecretStr: the value never shows in a repr, a log line or an error message.
    token: SecretStr | None = None
    revision: str = Field(default="main", min_length=1)
    pinned_revision: str | None = Field(default=None, pattern=COMMIT_SHA)
    prefix: str = ""
    timeout: float = Field(default=60.0, gt=0)
    create_repo: bool = False
    private: bool = True

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_http(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"endpoint must be an http(s) URL, not {value!r}")
        return value.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _prefix_is_a_folder(cls, value: str) -> str:
        """'' or a relative path, normalized to end with '/' so "a" and "a/" mean the same."""
        try:
            check_prefix(value)
        except InvalidKey as exc:
            raise ValueError(exc.message) from None
        if value and _reserved(value.rstrip("/") + "/x"):
            raise ValueError(f"prefix {value!r} goes through a folder the Hub or git reserves")
        return value if value == "" or value.endswith("/") else value + "/"


def _reserved(path: str) -> bool:
    """Whether a path in the repo is git's or the Hub's, not an object's."""
    segments = path.split("/")
    return (path in _RESERVED_PATHS or segments[-1] in _RESERVED_NAMES
            or any(s in _RESERVED_SEGMENTS for s in segments))


class _Body:
    """A streamed httpx response as the read(n)/close() stream ChunkReader reads."""

    def __init__(self, response: httpx.Response):
        self._response = response
        self._chunks: Iterator[bytes] | None = None

    def read(self, size: int) -> bytes:
        if self._chunks is None:  # ChunkReader always asks for the same size
            self._chunks = self._response.iter_bytes(size)
        return next(self._chunks, b"")

    def close(self) -> None:
        self._response.close()


class HuggingFaceBackend(Backend):
    """Files of `config.repo_id` under `config.prefix`, on branch `config.revision`."""

    driver: ClassVar[str] = "huggingface"
    Config: ClassVar[type[DriverConfig]] = HuggingFaceConfig
    config: HuggingFaceConfig

    def __init__(self, name: str, config: HuggingFaceConfig):
        super().__init__(name, config)
        # False, not None: the library would otherwise use HF_TOKEN or a cached login.
        self._token: str | bool = config.token.get_secret_value() if config.token else False
        self.api = HfApi(endpoint=config.endpoint, token=self._token, library_name="ferry")
        if config.pinned_revision:
            self.read_only = True  # this instance: the driver as such is writable
        self._repo_ready = not config.create_repo or self.read_only
        self._where = f"backend {name!r} ({config.repo_type} repo {config.repo_id!r} on {config.endpoint})"

    @property
    def _read_revision(self) -> str:
        return self.config.pinned_revision or self.config.revision

    # -- keys, calls and errors ---------------------------------------------------------

    def _path(self, key: str) -> str:
        check_key(key)
        path = self.config.prefix + key
        if _reserved(path):
            raise InvalidKey(f"key {key!r} names a file git or the Hub reserves ({path!r})", field="key")
        return path

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyBackend(
                f"{self._where} is pinned to commit {self.config.pinned_revision}: it is read-only"
            )

    def _call(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`method(*args, **kwargs)` with this backend's timeout, its failures as FerryErrors."""
        reset = _call_timeout.set(self.config.timeout)
        try:
            return method(*args, **kwargs)
        except FerryError:
            raise
        except Exception as exc:
            # The library's and httpx's failures; KeyError and TypeError too, which the library
            # raises when an answer lacks what it reads (a server that is no Hub).
            if not isinstance(exc, (httpx.HTTPError, OSError, EntryNotFoundError, ValueError, RuntimeError,
                                    LookupError, TypeError)):
                raise
            raise self._error(exc, what) from exc
        finally:
            _call_timeout.reset(reset)

    def _error(self, exc: BaseException, what: str) -> FerryError:
        """The Ferry error for a failure of the library (or of httpx under it) while doing `what`."""
        where = f"{self._where}: {what}"
        if isinstance(exc, FerryError):
            return exc
        # An LFS upload's failure comes wrapped: "Error while uploading 'x' to the Hub."
        if type(exc) is RuntimeError and exc.__cause__ is not None:
            return self._error(exc.__cause__, what)
        if isinstance(exc, EntryNotFoundError):
            return KeyNotFound(f"{what} not found on {self._where}")
        if isinstance(exc, GatedRepoError):
            return BackendError(f"{where}: the repo is gated: accept its conditions on the Hub with the "
                                "token's account")
        if isinstance(exc, RepositoryNotFoundError):
            # As for a missing S3 bucket: the backend as configured is unusable until someone
            # fixes it (check() says so), not a missing key.
            seen = "the token given" if self._token else "no token (none is set)"
            return BackendUnavailable(f"{where}: the repository does not exist, or is private and {seen} "
                                      "cannot see it")
        if isinstance(exc, RevisionNotFoundError):
            return BackendUnavailable(f"{where}: revision {self._read_revision!r} (or branch "
                                      f"{self.config.revision!r}) does not exist in the repository")
        if isinstance(exc, DisabledRepoError):
            return BackendError(f"{where}: the repository is disabled on the Hub")
        if isinstance(exc, OfflineModeIsEnabled):
            return BackendUnavailable(f"{where}: HF_HUB_OFFLINE is set in this process's environment")
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else 0
            message = exc.server_message or str(exc).strip().splitlines()[0]
            if status == 401:
                return BackendError(f"{where}: the Hub refused the token (HTTP 401): {message}")
            if status == 403:
                return BackendError(f"{where}: the token may not do this on the repository (HTTP 403): {message}")
            if status == 429 or status >= 500:
                return BackendUnavailable(f"{where}: HTTP {status}: {message}")
            return BackendError(f"{where}: HTTP {status}: {message}")
        if isinstance(exc, httpx.TransportError):
            return BackendUnavailable(f"{where}: cannot reach the Hub: {type(exc).__name__}: {exc}")
        if type(exc) is RuntimeError and "client has been closed" in str(exc):
            # After a refused connection the library closes its shared client, then retries
            # on the closed one, which httpx refuses with this error.
            return BackendUnavailable(f"{where}: cannot reach the Hub (connection failed, then {exc})")
        return BackendError(f"{where}: {type(exc).__name__}: {exc}")

    def _ready(self) -> None:
        """Create the repo first, if so configured (once per instance)."""
        if self._repo_ready:
            return
        c = self.config
        self._call(f"create repo {c.repo_id!r}", self.api.create_repo, c.repo_id, repo_type=c.repo_type,
                   private=c.private, exist_ok=True)
        self._repo_ready = True

    # -- verbs --------------------------------------------------------------------------

    def stat(self, key: str) -> ObjectStat:
        path = self._path(key)
        c = self.config
        # expand=True: the last commit that touched the file, for its mtime.
        infos = self._call(f"key {key!r}", self.api.get_paths_info, c.repo_id, [path], expand=True,
                           revision=self._read_revision, repo_type=c.repo_type)
        for info in infos:
            if isinstance(info, RepoFile) and info.path == path:
                return _stat(key, info)
        raise KeyNotFound(f"key {key!r} not found on {self._where}")  # absent, or a folder

    def read(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        path = self._path(key)
        c = self.config
        url = hf_hub_url(c.repo_id, path, repo_type=c.repo_type, revision=self._read_revision, endpoint=c.endpoint)
        headers = build_hf_headers(token=self._token, library_name="ferry")
        headers["Accept-Encoding"] = "identity"  # the stored bytes, as they are

        def open_stream() -> httpx.Response:
            from huggingface_hub.utils import get_session

            session = get_session()
            response = session.send(session.build_request("GET", url, headers=headers), stream=True)
            if response.status_code != 200:
                try:
                    response.read()  # a small error body
                    hf_raise_for_status(response)  # the Hub's error headers as the library's errors
                    raise BackendError(f"{self._where}: read {key!r}: unexpected HTTP {response.status_code}")
                finally:
                    response.close()
            return response

        response = self._call(f"key {key!r}", open_stream)
        return ChunkReader(_Body(response), chunk_size, lambda exc: self._error(exc, f"read {key!r}"),
                           errors=(httpx.HTTPError, OSError))

    def write(self, key: str, chunks: Iterable[bytes], size: int | None = None) -> int:
        path = self._path(key)
        self._writable()
        fd, spool = tempfile.mkstemp(prefix="ferry-hf-")
        try:
            total = 0
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    total += len(chunk)
                    if size is not None and total > size:
                        raise BackendError(f"write {key!r}: more than the announced {size} bytes")
                    out.write(chunk)
            if size is not None and total != size:
                raise BackendError(f"write {key!r}: got {total} bytes, {size} were announced")
            self._ready()
            self._commit_file(key, path, spool)
        finally:
            os.unlink(spool)
        return total

    def _commit_file(self, key: str, path: str, spool: str) -> None:
        c = self.config
        what = f"write {key!r}"
        # Hashes the file (sha256, read 1 MiB at a time) for the LFS batch and the commit.
        operation = CommitOperationAdd(path_in_repo=path, path_or_fileobj=spool)
        # Preuploading first (what create_commit would do) lets the driver look at the Hub's
        # answer before committing. The library keeps it in the operation's underscored
        # fields, stable across the version range pyproject allows.
        self._call(what, self.api.preupload_lfs_files, c.repo_id, [operation], repo_type=c.repo_type,
                   revision=c.revision)
        if operation._should_ignore:
            # The commit would silently leave the file out: refuse rather than report a write.
            raise BackendError(f"{self._where}: {what}: the repo's .gitignore ignores {path!r}, so the Hub "
                               "would not store it")
        if operation._remote_oid is not None and operation._remote_oid == operation._local_oid:
            return  # these very bytes are already there: the library would skip the commit, and log it
        with warnings.catch_warnings():
            if c.repo_type == "model" and path.endswith((".arrow", ".parquet")):
                # The library's hint that such files belong in a dataset repo; the repo type is
                # the operator's choice. catch_warnings is not thread-safe, so only here.
                warnings.filterwarnings("ignore", message="It seems that you are about to commit a data file")
            self._call(what, self.api.create_commit, c.repo_id, [operation], commit_message=f"Ferry: write {path}",
                       repo_type=c.repo_type, revision=c.revision)

    def delete(self, key: str) -> bool:
        path = self._path(key)
        self._writable()
        self._ready()
        c = self.config
        # One commit, no look-up first: the Hub refuses to delete a file it does not have.
        try:
            self._call(f"key {key!r}", self.api.create_commit, c.repo_id,
                       [CommitOperationDelete(path_in_repo=path, is_folder=False)],
                       commit_message=f"Ferry: delete {path}", repo_type=c.repo_type, revision=c.revision)
        except KeyNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectStat]:
        check_prefix(prefix)  # now, not at the first next()
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[ObjectStat]:
        c = self.config
        full = c.prefix + prefix
        folder = full.rsplit("/", 1)[0] if "/" in full else None  # the narrowest tree to ask for

        def collect() -> list[RepoFile]:
            tree = self.api.list_repo_tree(c.repo_id, path_in_repo=folder, recursive=True,
                                           revision=self._read_revision, repo_type=c.repo_type)
            return [e for e in tree if isinstance(e, RepoFile) and e.path.startswith(full)]

        try:
            files = self._call(f"list {prefix!r}", collect)
        except KeyNotFound:
            return  # no such folder (or it is a file): nothing listed
        strip = len(c.prefix)
        for entry in sorted(files, key=lambda e: e.path):
            key = entry.path[strip:]
            if _reserved(entry.path):
                continue
            try:
                check_key(key)
            except InvalidKey:
                continue  # a name no Ferry key has: not an object of this backend
            yield ObjectStat(key=key, size=int(entry.size), etag=_etag(entry))

    def check(self) -> None:
        c = self.config
        try:
            self._ready()
            info = self._call("check", self.api.repo_info, c.repo_id, repo_type=c.repo_type,
                              revision=self._read_revision, timeout=c.timeout)
        except FerryError as exc:
            raise BackendUnavailable(exc.message) from exc
        if not getattr(info, "sha", None):
            raise BackendUnavailable(f"{self._where}: check: the Hub answered without the revision's commit")


def _etag(entry: RepoFile) -> str:
    """The file's sha256 for an LFS file, else its git blob id."""
    return entry.lfs.sha256 if entry.lfs is not None else entry.blob_id


def _stat(key: str, entry: RepoFile) -> ObjectStat:
    last = entry.last_commit
    return ObjectStat(key=key, size=int(entry.size), mtime=last.date.timestamp() if last else None,
                      etag=_etag(entry))
