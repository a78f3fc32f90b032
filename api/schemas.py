"""Request and response models of the control API (they also make its OpenAPI)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ferry.catalog.models import ItemState, JobKind, JobState, ReplicaState


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable error code")
    message: str
    field: str | None = Field(None, description="the request field at fault, dotted")
    details: Any = None


class ErrorBody(BaseModel):
    """The one error shape every endpoint answers with."""

    error: ErrorDetail


class SourceSpec(Strict):
    backend: str = Field(description="name of the source backend")
    keys: list[str] | None = Field(None, description="keys to transfer; or give a prefix")
    prefix: str | None = Field(None, description="every key under this prefix ('' for all)")


class TargetSpec(Strict):
    backend: str
    prefix: str = Field("", description="prepended to each key less the source prefix")


class JobCreate(Strict):
    kind: JobKind
    source: SourceSpec
    targets: list[TargetSpec] = Field(min_length=1, max_length=32)
    keep_source: bool = Field(False, description="migrate only: keep the source after the copy is verified")


class JobAccepted(BaseModel):
    id: uuid.UUID
    state: JobState
    url: str


class ItemCounts(BaseModel):
    queued: int
    running: int
    done: int
    failed: int
    skipped: int
    cancelled: int
    total: int


class ByteCounts(BaseModel):
    done: int = Field(description="bytes of items done or skipped")
    known: int = Field(description="bytes of all items whose size is known")
    in_flight: int = Field(description="bytes copied so far of items still running")


class JobOut(BaseModel):
    id: uuid.UUID
    kind: JobKind
    state: JobState
    source: dict[str, Any]
    targets: list[dict[str, Any]]
    keep_source: bool
    total: int | None = Field(description="number of items; null while the source is listed")
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    items: ItemCounts
    bytes: ByteCounts


class JobList(BaseModel):
    jobs: list[JobOut]


class JobListQuery(Strict):
    state: JobState | None = None
    limit: int = Field(20, ge=1, le=200)


class ItemOut(BaseModel):
    seq: int
    source_key: str
    dest_backend: str
    dest_key: str
    state: ItemState
    attempts: int
    size: int | None
    error: str | None
    updated_at: datetime | None


class ItemQuery(Strict):
    state: ItemState | None = None
    after: int = Field(-1, ge=-1, description="return items with seq greater than this")
    limit: int = Field(100, ge=1, le=1000)


class ItemPage(BaseModel):
    items: list[ItemOut]
    next_after: int | None = Field(description="pass as `after` for the next page; null at the end")


class ReplicaOut(BaseModel):
    backend: str
    key: str
    state: ReplicaState
    verified_at: datetime | None
    last_error: str | None
    updated_at: datetime


class ObjectOut(BaseModel):
    cid: str
    sha256: str
    size: int
    media_type: str | None
    created_at: datetime
    replicas: list[ReplicaOut]


class BackendOut(BaseModel):
    name: str
    driver: str
    labels: dict[str, str]
    settings: dict[str, Any] = Field(description="secrets appear only as {env: ...}/{file: ...} references")
    queue: str


class BackendList(BaseModel):
    backends: list[BackendOut]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
