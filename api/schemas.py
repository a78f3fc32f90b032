"""Request and response models of the control API (they also make its OpenAPI)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)

from ferry.catalog.models import ItemState, JobKind, JobState, ReplicaState


def _refuse_nul(value: Any) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text may not contain a NUL character")
    elif isinstance(value, dict):
        for k, v in value.items():
            _refuse_nul(k)
            _refuse_nul(v)
    elif isinstance(value, list):
        for v in value:
            _refuse_nul(v)


class Strict(BaseModel):
    """A request body or query: unknown fields are refused, and so is a NUL character in any
    text, which the catalog (Postgres) can neither store nor compare."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")  # after parsing: a nested model has checked its own fields
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        _refuse_nul(value)
        return value


def _storable(value: datetime) -> datetime:
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the instant is outside years 1 to 9999 in UTC") from None
    return value


# An instant in a request: with its UTC offset (a naive time would be ambiguous, and the
# catalog's columns refuse it) and within the years the catalog can hold.
Instant = Annotated[AwareDatetime, AfterValidator(_storable)]
# Bounds of the catalog's integer columns: a query value past them is refused here (422)
# rather than reaching the database, which fails on it.
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1


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


class DealTerms(Strict):
    copies: int | None = Field(None, ge=1, le=16, description="deals per piece (default: the backend's `copies`)")
    verified: bool | None = Field(None, description="verified (datacap) deals (default: the backend's `verified`)")
    regions: list[str] | None = Field(None, max_length=32, description="only providers in these regions")
    spread_regions: bool = Field(False, description="every copy of a piece in a distinct region")
    max_price: int | None = Field(None, ge=0, le=MAX_INT64,
                                  description="attoFIL per GiB per epoch, at most")


class JobCreate(Strict):
    kind: Literal["migrate", "replicate", "verify", "deal", "index"]
    source: SourceSpec
    targets: list[TargetSpec] = Field([], max_length=32,
                                      description="migrate/replicate: where to; deal: the filecoin backend; "
                                                  "verify, index: none")
    keep_source: bool = Field(False, description="migrate only: keep the source after the copy is verified")
    tags: list[str] = Field([], max_length=100, description="migrate/replicate: tags added to every object copied")
    sample: float | None = Field(None, gt=0, le=100,
                                 description="verify only: check this percentage of the keys (chosen by hash)")
    deal: DealTerms | None = Field(None, description="deal only: copies, verified, regions, price cap")


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
    stuck: int
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
    action: str
    source_backend: str | None
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
    after: int = Field(-1, ge=-1, le=MAX_INT32, description="return items with seq greater than this")
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
    tags: list[str]
    metadata: dict[str, Any]
    created_at: datetime
    last_accessed_at: datetime | None
    legal_hold: bool
    lost_at: datetime | None = Field(description="set when no verified replica is left")
    replicas: list[ReplicaOut]


class ObjectLabels(Strict):
    """Tags, metadata and media type: what policy selectors match on."""

    add_tags: list[str] = Field([], max_length=100)
    remove_tags: list[str] = Field([], max_length=100)
    metadata: dict[str, str | int | float | bool | None] = Field(
        {}, description="keys to set; a null value removes the key")
    media_type: str | None = Field(None, pattern=r"^[\w.+-]+/[\w.+-]+$")


class HoldUpdate(Strict):
    hold: bool = Field(description="true: retention may not delete the object; false: release")


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


class PolicyApply(Strict):
    """A policy document (docs/policy.schema.json), as YAML text or as a JSON object."""

    yaml: str | None = Field(None, max_length=1_000_000)
    document: dict[str, Any] | None = None


class PolicyOut(BaseModel):
    name: str
    version: int
    changed: bool = Field(False, description="apply only: whether this stored a new version")
    document: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    next_run_at: datetime | None = Field(description="when scheduled work may next start")
    run_started_at: datetime | None = Field(description="the open run's start; null when none is open")
    last_pass_at: datetime | None
    converged_at: datetime | None
    versions: list[dict[str, Any]] | None = None


class PolicyList(BaseModel):
    policies: list[PolicyOut]


class VerbPlan(BaseModel):
    objects: int
    bytes: int
    backends: dict[str, dict[str, int]]


class PolicyPlan(BaseModel):
    name: str
    active: bool = Field(description="whether its schedule lets a pass plan this work now")
    copy_: VerbPlan = Field(alias="copy", serialization_alias="copy")
    move: VerbPlan
    delete: VerbPlan
    verify: VerbPlan


class PolicyStatus(BaseModel):
    name: str
    matched: int
    converged: int
    replicating: int
    stuck: int
    bad: int
    lost: int
    next_run_at: datetime | None
    run_started_at: datetime | None
    last_pass_at: datetime | None
    converged_at: datetime | None


class RetryOut(BaseModel):
    requeued: int


class EventOut(BaseModel):
    id: int
    created_at: datetime
    kind: str
    severity: str
    message: str
    cid: str | None
    policy: str | None
    backend: str | None
    details: dict[str, Any]


class EventQuery(Strict):
    kind: str | None = None
    cid: str | None = None
    after: int = Field(0, ge=0, le=MAX_INT64)
    limit: int = Field(100, ge=1, le=1000)


class EventList(BaseModel):
    events: list[EventOut]


class Finding(BaseModel):
    backend: str
    key: str
    cid: str
    result: str = Field(description="bad or missing")
    error: str | None
    healing: str = Field(description="scheduled (a good replica exists to repair from), in_progress, healed, "
                                     "or lost (no good replica left)")


class VerifyReport(BaseModel):
    job_id: uuid.UUID
    checked: int
    ok: int
    bad: int
    missing: int
    bytes_read: int
    healing_scheduled: int
    lost: int
    findings: list[Finding] = Field(description="the bad and missing replicas (first 1000)")


class GrantSpec(Strict):
    backends: str = Field(min_length=1, max_length=255, description="fnmatch pattern over backend names")
    access: Literal["read", "write"] = Field(description="write includes read")


class KeyCreate(Strict):
    name: str = Field(min_length=1, max_length=255, description="who or what uses the key")
    role: Literal["admin", "operator", "viewer"]
    grants: list[GrantSpec] = Field(default_factory=list, max_length=100,
                                    description="backends an operator or viewer may touch (admins: all)")
    expires_at: Instant | None = Field(None, description="after this instant the key is refused")


class KeyOut(BaseModel):
    id: uuid.UUID
    prefix: str = Field(description="names the key; the key itself is shown only at creation")
    name: str
    role: str
    grants: list[GrantSpec]
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the API key: shown this once, stored only as a hash")


class KeyList(BaseModel):
    keys: list[KeyOut]


class AuditQuery(Strict):
    actor: str | None = Field(None, max_length=255)
    outcome: Literal["ok", "failed", "denied", "unauthenticated"] | None = None
    action: str | None = Field(None, max_length=128)
    job_id: str | None = Field(None, max_length=64)
    policy: str | None = Field(None, max_length=255)
    backend: str | None = Field(None, max_length=255)
    cid: str | None = Field(None, max_length=128)
    since: Instant | None = None
    until: Instant | None = None
    before_id: int | None = Field(None, ge=1, le=MAX_INT64, description="page: entries older than this id")
    limit: int = Field(100, ge=1, le=1000)


class AuditEntryOut(BaseModel):
    id: int
    at: datetime
    actor: str | None
    actor_kind: str | None
    role: str | None
    client: str | None
    method: str
    path: str
    action: str | None
    status: int
    outcome: str
    job_id: str | None
    policy: str | None
    backends: list[str]
    cid: str | None
    detail: str | None


class AuditList(BaseModel):
    entries: list[AuditEntryOut]
    next_before_id: int | None = Field(description="pass as before_id for the next page; null at the end")


class BackendCheck(Strict):
    name: str = Field("candidate", min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    driver: str = Field(min_length=1, max_length=40)
    labels: dict[str, str] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)


class CapacityOut(BaseModel):
    used: int
    limit: int | None


class BackendCheckOut(BaseModel):
    name: str
    driver: str
    ok: bool = Field(description="the backend answered as its protocol promises")
    error: str | None
    capacity: CapacityOut | None
    seconds: float


# -- Filecoin: deals, providers, quotes, schedules ------------------------------------------


class DealOut(BaseModel):
    id: uuid.UUID
    state: str
    backend: str
    provider: str
    client: str
    piece_cid: str
    padded_size: int
    car_size: int
    verified: bool
    price_per_epoch: int | None = Field(description="attoFIL per epoch, as proposed (the chain's once published)")
    duration: int = Field(description="epochs")
    start_epoch: int | None
    end_epoch: int | None
    sector_start_epoch: int | None
    chain_deal_id: int | None
    proposal_id: str | None
    attempt: int
    retry_of: uuid.UUID | None
    renewal_of: uuid.UUID | None
    job_id: uuid.UUID | None
    schedule: str | None
    error: str | None
    created_at: datetime
    proposed_at: datetime | None
    published_at: datetime | None
    activated_at: datetime | None
    ended_at: datetime | None
    objects: list[str] = Field([], description="CIDs of the objects in the piece (GET /v1/deals/{id} only)")


class DealList(BaseModel):
    deals: list[DealOut]
    next_before: datetime | None = Field(description="pass as `before` for the next page")


class DealQuery(Strict):
    state: Literal["planned", "proposed", "published", "active", "expiring", "expired", "rejected", "failed",
                   "slashed"] | None = None
    provider: str | None = Field(None, max_length=32)
    piece: str | None = Field(None, max_length=128, description="piece CID")
    cid: str | None = Field(None, max_length=128, description="an object's CID: the deals holding it")
    job_id: uuid.UUID | None = None
    before: Instant | None = Field(None, description="only deals created before this instant")
    limit: int = Field(100, ge=1, le=1000)


class DealRetryOut(BaseModel):
    planned: list[uuid.UUID]


class ProviderIn(Strict):
    id: str = Field(pattern=r"^f0[0-9]{1,20}$", description="the provider's actor id, f0...")
    region: str | None = Field(None, max_length=63)
    price: int = Field(0, ge=0, le=MAX_INT64, description="attoFIL per GiB per epoch, unverified deals")
    verified_price: int = Field(0, ge=0, le=MAX_INT64, description="attoFIL per GiB per epoch, verified deals")
    min_piece_size: int = Field(256, ge=128, le=MAX_INT64)
    max_piece_size: int = Field(2**36, ge=128, le=MAX_INT64)
    verified: bool = Field(True, description="takes verified deals")
    retrieval_url: str | None = Field(None, max_length=1024, description="trustless HTTP retrieval base URL")
    access: Literal["auto", "allow", "deny"] = "auto"
    notes: str | None = Field(None, max_length=2000)


class ReputationOut(BaseModel):
    proposed: int
    rejected: int
    activated: int
    failed: int
    slashed: int
    median_activation_hours: float | None
    score: float


class ProviderOut(BaseModel):
    id: str
    region: str | None
    price: int
    verified_price: int
    min_piece_size: int
    max_piece_size: int
    verified: bool
    retrieval_url: str | None
    access: str
    notes: str | None
    reputation: ReputationOut


class ProviderList(BaseModel):
    providers: list[ProviderOut]


class QuoteRequest(Strict):
    source: SourceSpec
    backend: str = Field(description="the filecoin backend that would make the deals")
    deal: DealTerms = DealTerms()
    duration: int | None = Field(None, ge=2880, le=MAX_INT64 // 2**40, description="epochs (default: the backend's)")


class ProviderQuote(BaseModel):
    provider: str
    region: str | None
    price: int = Field(description="attoFIL per GiB per epoch")
    cost: int = Field(description="attoFIL for every piece for the duration, with this provider")
    reputation: float


class QuoteOut(BaseModel):
    objects: int
    bytes: int
    pieces: int = Field(description="pieces the objects would be packed into")
    padded_bytes: int
    copies: int
    verified: bool
    duration: int
    providers: list[ProviderQuote] = Field(description="eligible providers, in the order Ferry would choose")
    storage_cost: int = Field(description="attoFIL: every piece with the `copies` first providers")
    gas_cost: int = Field(description="attoFIL: gas_per_deal x base fee x deals")
    total_cost: int
    total_fil: str
    excluded: dict[str, str] = Field(description="providers that could not take the deals, and why")
    too_big: int = Field(description="objects larger than a piece")


class DealScheduleIn(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    source: SourceSpec = Field(description="where the objects are: a backend and a prefix")
    backend: str = Field("filecoin", description="the filecoin backend that makes the deals")
    deal: DealTerms = DealTerms()
    schedule: Any = Field(description='when it runs: {"cron": "0 * * * *"} or {"every": "6h"}')
    deals_per_run: int = Field(10, ge=1, le=100_000, description="deals one run makes at most")
    max_pending: int | None = Field(None, ge=1, le=MAX_INT32, description="deals proposed or published, at most")
    total_deals: int | None = Field(None, ge=1, le=MAX_INT32,
                                    description="deals the schedule makes in all (rejected and failed ones aside)")
    total_bytes: int | None = Field(None, ge=1, le=MAX_INT64, description="padded bytes of those deals, at most")
    paused: bool = False


class DealScheduleOut(BaseModel):
    name: str
    spec: dict[str, Any]
    paused: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_error: str | None
    pending: int = Field(description="its deals planned, proposed or published")
    made: int = Field(description="its deals, rejected and failed ones aside")
    made_bytes: int


class DealScheduleList(BaseModel):
    schedules: list[DealScheduleOut]


MediaTypePattern = Annotated[str, Field(pattern=r"^[\w.+-]+/(\*|[\w.+-]+)$", max_length=255)]


class SearchFilters(Strict):
    """Every condition given must hold."""

    tags: list[Annotated[str, Field(min_length=1, max_length=255)]] = Field(
        [], max_length=50, description="the object has all these tags")
    media_type: list[MediaTypePattern] = Field(
        [], max_length=20, description='any of these media types, exact ("text/csv") or whole ("text/*")')
    metadata: dict[Annotated[str, Field(min_length=1, max_length=255)], str | int | float | bool] = Field(
        {}, max_length=50, description="each metadata key equals the value")
    backend: list[Annotated[str, Field(min_length=1, max_length=63)]] = Field(
        [], max_length=50, description="the object has a verified replica on one of these backends")
    created_after: Instant | None = None
    created_before: Instant | None = None
    indexed_after: Instant | None = None
    indexed_before: Instant | None = None


class SearchRequest(Strict):
    query: str = Field(min_length=1, max_length=1000, description=(
        "web-search syntax: words are all required, \"a phrase\", `or`, -excluded (text and hybrid); "
        "the whole query is embedded for vector search"))
    mode: Literal["text", "vector", "hybrid"] = "hybrid"
    filters: SearchFilters = Field(default_factory=SearchFilters)
    limit: int = Field(10, ge=1, le=100)
    offset: int = Field(0, ge=0, le=10_000)
    weight: float = Field(0.5, ge=0, le=1, description=(
        "hybrid: the vector ranking's share in reciprocal rank fusion (0: text only, 1: vector only)"))

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the query is blank")
        return value


class SearchHit(BaseModel):
    cid: str
    name: str | None
    title: str | None
    media_type: str
    size: int
    tags: list[str]
    created_at: datetime
    indexed_at: datetime
    metadata_only: bool = Field(description="binary or unextractable content: found by name and metadata")
    score: float = Field(description="text: ts_rank/BM25; vector: cosine; hybrid: fused reciprocal-rank score")
    text_rank: int | None = Field(None, description="rank in the full-text results (1 = best)")
    vector_rank: int | None = Field(None, description="rank in the vector results (1 = best)")
    snippet: str = Field(description="the best chunk, HTML-escaped, matches in <mark>")
    chunk: int | None = Field(None, description="id of the chunk shown")


class SearchResponse(BaseModel):
    query: str
    mode: str
    hits: list[SearchHit]
    offset: int
    next_offset: int | None = Field(None, description="offset of the next page; absent on the last")
    took_ms: float
    vector_generation: int | None = Field(None, description="the vector index snapshot searched")


class ObjectText(BaseModel):
    cid: str
    name: str | None
    title: str | None
    media_type: str
    metadata_only: bool
    truncated: bool
    reason: str | None = Field(None, description="why the text is metadata only or truncated")
    chunks: int
    model: str
    indexed_at: datetime
    source_backend: str | None
    text: str


# -- Live events (/v1/events/stream) ---------------------------------------------------------

EventType = Literal["job", "replica", "alert"]
EVENT_TYPES: tuple[str, ...] = ("job", "replica", "alert")
Name = Annotated[str, Field(min_length=1, max_length=63)]


def _comma_list(value: Any) -> Any:
    """`a,b` and `a&a=b` alike: a repeated parameter, a comma list, or both."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        return value
    out: list[Any] = []
    for v in values:
        for part in (v.split(",") if isinstance(v, str) else [v]):
            if part != "" and part not in out:
                out.append(part)
    return out


class EventStreamQuery(Strict):
    job: list[uuid.UUID] = Field([], max_length=100, description=(
        "only these jobs' events, starting with their state now (alerts and replicas name no job: none are "
        "sent; a job's items are at /v1/jobs/{id}/items)"))
    policy: list[Name] = Field([], max_length=50, description=(
        "only job events of work serving these policies, and alerts about them (replicas name no policy: "
        "none are sent)"))
    backend: list[Name] = Field([], max_length=50, description=(
        "only events about these backends: jobs naming one, replicas on one, alerts about one"))
    types: list[EventType] = Field(list(EVENT_TYPES), min_length=1, max_length=3,
                                   description="the kinds of event to send")
    until: Literal["job_done"] | None = Field(None, description=(
        "job_done: end the stream after the terminal event of every job given in `job`"))
    max_seconds: float = Field(3600, ge=0, le=3600, allow_inf_nan=False, description=(
        "end the stream after this long (0: one look at the catalog); reconnect with the last event id to go on"))
    since: Instant | None = Field(None, description="start from this instant instead of now")
    cursor: str | None = Field(None, max_length=4096, description=(
        "resume after this event id (what Last-Event-ID carries, for clients that cannot set headers)"))

    @field_validator("job", "policy", "backend", "types", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _comma_list(value)


class ReplicaEvent(ReplicaOut):
    """A replica whose row changed: its state now (the state before is not kept)."""

    cid: str


class StreamEnd(BaseModel):
    reason: Literal["job_done", "max_seconds", "unauthenticated"] = Field(description=(
        "job_done: every job of `until` ended; max_seconds: the time bound (reconnect with the last id to go "
        "on); unauthenticated: the credentials were revoked or expired"))
