"""The one error tree of Ferry.

Every error Ferry raises on purpose is a `FerryError`. Each class carries a stable
machine-readable `code`, the HTTP status the API answers with, and whether the
failure is `transient` (worth retrying) or final. The API turns them into its one
JSON error shape; the CLI turns them into a message and an exit code.
"""

from __future__ import annotations

from typing import Any


class FerryError(Exception):
    """Raised when Ferry refuses or fails something for a reason it can name."""

    code = "ferry_error"
    status = 500
    transient = False

    def __init__(self, message: str, *, field: str | None = None, details: Any = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.details is not None:
            body["details"] = self.details
        return body


class ConfigError(FerryError):
    """Raised when settings or the backends file are missing or invalid."""

    code = "config_error"


class InvalidRequest(FerryError):
    """Raised when a request (API body, CLI argument) fails validation."""

    code = "invalid_request"
    status = 422


class InvalidKey(InvalidRequest):
    """Raised when an object key or prefix is malformed or escapes a backend's root."""

    code = "invalid_key"


class UnknownBackend(InvalidRequest):
    """Raised when a request names a backend that is not configured."""

    code = "unknown_backend"


class ReadOnlyBackend(InvalidRequest):
    """Raised when something would be written to or deleted from a read-only backend."""

    code = "read_only_backend"


class InvalidPolicy(InvalidRequest):
    """Raised when a policy document fails its schema; `field` names the path of the fault."""

    code = "invalid_policy"
    status = 400


class NotFound(FerryError):
    """Raised when a requested resource does not exist."""

    code = "not_found"
    status = 404


class JobNotFound(NotFound):
    """Raised when no job has the given id."""

    code = "job_not_found"


class ObjectNotFound(NotFound):
    """Raised when no object in the catalog has the given CID."""

    code = "object_not_found"


class PolicyNotFound(NotFound):
    """Raised when no policy has the given name."""

    code = "policy_not_found"


class Conflict(FerryError):
    """Raised when a request conflicts with the current state (e.g. cancelling a finished job)."""

    code = "conflict"
    status = 409


class BackendError(FerryError):
    """Raised when a storage backend fails an operation."""

    code = "backend_error"
    status = 502


class BackendUnavailable(BackendError):
    """Raised when a backend cannot be reached; the work is retried later."""

    code = "backend_unavailable"
    status = 503
    transient = True


class KeyNotFound(BackendError):
    """Raised when a key does not exist on a backend."""

    code = "key_not_found"
    status = 404


class DriverNotInstalled(ConfigError):
    """Raised when a backend's driver needs an optional dependency that is not installed."""

    code = "driver_not_installed"


class ChecksumMismatch(BackendError):
    """Raised when bytes read back from a backend do not hash to what was written."""

    code = "checksum_mismatch"


class ServiceDiscontinued(ReadOnlyBackend):
    """Raised when a backend's service has shut down an operation for good (Storacha's uploads)."""

    code = "service_discontinued"
    status = 410


class SearchUnavailable(FerryError):
    """Raised when vector search or indexing needs what this process lacks: the search extra
    (sentence-transformers, FAISS) or the embedding model on disk."""

    code = "search_unavailable"
    status = 503
