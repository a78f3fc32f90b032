"""Tables and state enums of the catalog. The same models run on Postgres and SQLite."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Tags and metadata are matched by policies: JSONB on Postgres gives containment (@>).
Document = JSON().with_variant(JSONB(), "postgresql")

# Object keys compare by code point, as S3 lists them, on both databases (SQLite's BINARY is
# already that): a key prefix is then an exact range the (backend, key) index serves.
ObjectKey = String(1024).with_variant(String(1024, collation="C"), "postgresql")

# SQLite only auto-increments INTEGER PRIMARY KEY; Postgres gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timestamp that is always timezone-aware UTC in Python (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class ReplicaState(enum.StrEnum):
    pending = "pending"      # wanted here, no work started
    copying = "copying"      # a worker is writing it
    present = "present"      # written and verified (hash re-read at verified_at)
    suspect = "suspect"      # a check could not confirm it; to be re-verified
    bad = "bad"              # failed verification (hash mismatch); counts as absent
    missing = "missing"      # verification found nothing at its key; counts as absent
    deleting = "deleting"    # removal decided and under way
    gone = "gone"            # removed from the backend


# A replica in these states holds the object's bytes, verified.
GOOD_REPLICA_STATES = (ReplicaState.present,)
# In these, Ferry knows the bytes at the key are wrong or gone: repaired from a good replica.
BROKEN_REPLICA_STATES = (ReplicaState.bad, ReplicaState.missing)


class JobKind(enum.StrEnum):
    migrate = "migrate"
    replicate = "replicate"
    verify = "verify"          # re-hash replicas under a prefix (on demand)
    reconcile = "reconcile"    # the work one reconcile pass found missing (policies, healing)
    deal = "deal"              # pack objects into pieces and make Filecoin storage deals of them
    index = "index"            # extract objects' text into the full-text and vector indexes
    delete = "delete"          # remove an object's replicas from every backend (DELETE /v1/objects/{cid})


class JobState(enum.StrEnum):
    pending = "pending"                    # stored; its source prefix is still being listed
    running = "running"                    # every item is known; work under way
    succeeded = "succeeded"
    failed = "failed"
    partially_failed = "partially_failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_JOB_STATES


TERMINAL_JOB_STATES = frozenset(
    {JobState.succeeded, JobState.failed, JobState.partially_failed, JobState.cancelled}
)


class ItemState(enum.StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    skipped = "skipped"      # already present and verified at the target
    cancelled = "cancelled"
    stuck = "stuck"          # reconcile work that kept failing; waits for `ferry policy retry`


class ItemAction(enum.StrEnum):
    copy = "copy"            # source -> dest, verified (a move is a copy, then a delete of the source)
    delete = "delete"        # remove the replica at dest
    verify = "verify"        # re-read and re-hash the replica at dest
    deal = "deal"            # pack the object into a piece for Filecoin deals made by dest
    index = "index"          # extract the object's text and embed it (on the `index` queue)


class CheckResult(enum.StrEnum):
    ok = "ok"
    bad = "bad"              # bytes differ from the object's sha256
    missing = "missing"      # nothing at the key


OPEN_ITEM_STATES = (ItemState.queued, ItemState.running)

# The destination of index items: the search indexes. Not a backend (no backend name can
# start with "@"); their work goes to the `index` queue.
SEARCH_INDEX = "@search"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as text with a CHECK constraint: portable, and a new state needs no type migration.
    return Enum(cls, name=name, native_enum=False, length=24, create_constraint=True,
                values_callable=lambda e: [m.value for m in e], validate_strings=True)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Backend(Base):
    """A configured storage instance, mirrored from the backends file (secrets as references)."""

    __tablename__ = "backends"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    driver: Mapped[str] = mapped_column(String(40))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class StoredObject(Base):
    """Content identity: the same bytes are one object, wherever they are stored."""

    __tablename__ = "objects"
    __table_args__ = (
        # Tag filters (search, policy selectors) are JSONB containment: a GIN index serves them.
        Index("ix_objects_tags", "tags", postgresql_using="gin", postgresql_ops={"tags": "jsonb_path_ops"})
        .ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    cid: Mapped[str] = mapped_column(String(128), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str | None] = mapped_column(String(255))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", Document, default=dict)
    tags: Mapped[list[Any]] = mapped_column(Document, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Last read through the API: age-based transitions count from here.
    last_accessed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Blocks deletion by retention while set.
    legal_hold: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Set when no verified replica is left: nothing of it is deleted, an alert is raised.
    lost_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    replicas: Mapped[list[Replica]] = relationship(back_populates="object", order_by="Replica.id")


class Replica(Base):
    """One object at one key on one backend, and what Ferry last knew of it."""

    __tablename__ = "replicas"
    __table_args__ = (
        UniqueConstraint("backend", "key", name="uq_replicas_backend_key"),
        Index("ix_replicas_state", "state"),
        # Live events read the replicas changed since a cursor (updated_at, id), in that order.
        Index("ix_replicas_updated_at", "updated_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    object_id: Mapped[int] = mapped_column(ForeignKey("objects.id", ondelete="CASCADE"), index=True)
    backend: Mapped[str] = mapped_column(ForeignKey("backends.name"))
    key: Mapped[str] = mapped_column(ObjectKey)
    state: Mapped[ReplicaState] = mapped_column(_enum(ReplicaState, "replica_state"))
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    object: Mapped[StoredObject] = relationship(back_populates="replicas")


class Job(Base):
    """A bulk request; its items carry the per-object work and outcomes."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), index=True)
    # The backend listed or read from; None for reconcile work, whose items name their sources.
    source_backend: Mapped[str | None] = mapped_column(String(63))
    # The request as accepted: source keys or prefix, targets, options.
    spec: Mapped[dict[str, Any]] = mapped_column()
    total: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Live events look up the jobs that ended since a cursor.
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)


class JobItem(Base):
    """One object's work within a job: `action` on `dest_key` at `dest_backend` (for a copy,
    from `source_key` on the item's `source_backend`, else the job's).

    Items are numbered 0..n-1 within their job, so a message names a span of items
    (`seq` from..to) instead of a list of ids. Work goes to `dest_backend`'s queue.
    """

    __tablename__ = "job_items"
    __table_args__ = (
        Index("ix_job_items_job_state", "job_id", "state"),
        Index("ix_job_items_state_lease", "state", "lease_until"),
        # Work in flight or stuck on an object: what a reconcile pass must not enqueue again.
        Index("ix_job_items_open_object", "object_id", "dest_backend",
              postgresql_where=text("state IN ('queued', 'running', 'stuck')"),
              sqlite_where=text("state IN ('queued', 'running', 'stuck')")),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    action: Mapped[ItemAction] = mapped_column(_enum(ItemAction, "item_action"), default=ItemAction.copy,
                                               server_default=ItemAction.copy.value)
    source_backend: Mapped[str | None] = mapped_column(String(63))
    # The policy whose requirement this work serves (None: a user's job, or healing).
    policy: Mapped[str | None] = mapped_column(String(63))
    source_key: Mapped[str] = mapped_column(String(1024))
    dest_backend: Mapped[str] = mapped_column(String(63))
    dest_key: Mapped[str] = mapped_column(String(1024))
    state: Mapped[ItemState] = mapped_column(_enum(ItemState, "item_state"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    size: Mapped[int | None] = mapped_column(BigInteger)
    # Bytes copied so far while the item runs: progress of a large object in flight.
    bytes_copied: Mapped[int | None] = mapped_column(BigInteger)
    object_id: Mapped[int | None] = mapped_column(BigId)
    error: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Policy(Base):
    """A standing request, authored as YAML; `document` is its current version."""

    __tablename__ = "policies"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    document: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Deleted policies keep their versions; applying the name again revives it.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Schedule: its work may start at next_run_at; a run stays open from run_started_at
    # until a pass finds nothing left to do (or its window closes).
    next_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    run_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_pass_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    converged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class PolicyVersion(Base):
    """Every version of every policy, as applied."""

    __tablename__ = "policy_versions"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    document: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ReplicaCheck(Base):
    """One verification of one replica: when, what it found, how many bytes it read."""

    __tablename__ = "replica_checks"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    replica_id: Mapped[int] = mapped_column(ForeignKey("replicas.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    result: Mapped[CheckResult] = mapped_column(_enum(CheckResult, "check_result"))
    bytes_read: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)


class Event(Base):
    """Something ops must hear of (an object lost, a policy stuck): kept, listed by the API."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(63))
    severity: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    cid: Mapped[str | None] = mapped_column(String(128))
    policy: Mapped[str | None] = mapped_column(String(63))
    backend: Mapped[str | None] = mapped_column(String(63))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Role(enum.StrEnum):
    admin = "admin"        # everything: keys, audit, legal holds, every backend
    operator = "operator"  # submit and cancel jobs, policies, labels; on granted backends only
    viewer = "viewer"      # read the catalog, jobs, policies, events; content from granted backends


class ApiKey(Base):
    """An API key: only its sha256 is kept (the key is shown once, at creation); `prefix`
    names it in lists, logs and the audit log."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    # [{"backends": "ipfs-*", "access": "read" | "write"}]; write includes read.
    grants: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(255))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditEntry(Base):
    """One mutating call or denied attempt. Append-only: the database refuses UPDATE and
    DELETE on this table (triggers, migration 0005)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str | None] = mapped_column(String(255), index=True)  # key prefix or OIDC subject
    actor_kind: Mapped[str | None] = mapped_column(String(16))           # key | oidc
    role: Mapped[str | None] = mapped_column(String(16))
    client: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(2048))
    action: Mapped[str | None] = mapped_column(String(128))  # the endpoint, e.g. jobs.create
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16), index=True)  # ok | failed | denied | unauthenticated
    job_id: Mapped[str | None] = mapped_column(String(64))
    policy: Mapped[str | None] = mapped_column(String(255))
    backends: Mapped[list[str]] = mapped_column(JSON, default=list)
    cid: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(Text)


class DealState(enum.StrEnum):
    planned = "planned"        # Ferry chose a provider; nothing sent yet
    proposed = "proposed"      # the deal tool sent the proposal and the provider took it
    published = "published"    # on chain (a deal id), not yet in a proven sector
    active = "active"          # the chain shows it sealed (sector start) and not slashed
    expiring = "expiring"      # active, within the renewal window before its end epoch
    expired = "expired"        # past its end epoch
    rejected = "rejected"      # the provider refused the proposal
    failed = "failed"          # anything else ended it (proposal expired, bad fetch, datacap short...)
    slashed = "slashed"        # the chain shows a slash epoch: the provider lost the data

    @property
    def open(self) -> bool:
        return self in OPEN_DEAL_STATES


# Deals that may still become (or are) active: a piece's copies count them while planning.
OPEN_DEAL_STATES = frozenset({DealState.planned, DealState.proposed, DealState.published})
LIVE_DEAL_STATES = frozenset({DealState.active, DealState.expiring})
ENDED_DEAL_STATES = frozenset({DealState.expired, DealState.rejected, DealState.failed, DealState.slashed})


class ProviderAccess(enum.StrEnum):
    auto = "auto"      # chosen on reputation and price
    allow = "allow"    # preferred: ranked before every auto provider
    deny = "deny"      # never chosen


class Provider(Base):
    """A Filecoin storage provider Ferry may make deals with: its terms as ops entered
    them, and a manual allow/deny. Its reputation is computed from Ferry's own deals."""

    __tablename__ = "providers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # actor id, f0...
    region: Mapped[str | None] = mapped_column(String(63))
    # attoFIL per GiB per epoch, for unverified and verified (datacap) deals.
    price: Mapped[int] = mapped_column(BigInteger, default=0)
    verified_price: Mapped[int] = mapped_column(BigInteger, default=0)
    min_piece_size: Mapped[int] = mapped_column(BigInteger, default=256)
    max_piece_size: Mapped[int] = mapped_column(BigInteger, default=2**36)
    verified: Mapped[bool] = mapped_column(Boolean, default=True)  # takes verified deals
    # Trustless HTTP retrieval base URL (booster-http): /ipfs/{cid} below it.
    retrieval_url: Mapped[str | None] = mapped_column(String(1024))
    access: Mapped[ProviderAccess] = mapped_column(_enum(ProviderAccess, "provider_access"),
                                                   default=ProviderAccess.auto)
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Piece(Base):
    """A CARv1 file of whole objects, prepared for deals: its piece CID (CommP), padded
    size and where the CAR lies for providers to fetch."""

    __tablename__ = "pieces"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    piece_cid: Mapped[str] = mapped_column(String(128), unique=True)
    padded_size: Mapped[int] = mapped_column(BigInteger)
    car_size: Mapped[int] = mapped_column(BigInteger)
    root_cid: Mapped[str] = mapped_column(String(128))  # the first object's: the deal label
    backend: Mapped[str] = mapped_column(String(63))    # the filecoin backend that made it
    path: Mapped[str | None] = mapped_column(String(1024))  # the CAR, None once removed
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class PieceObject(Base):
    """Which objects a piece holds."""

    __tablename__ = "piece_objects"

    piece_id: Mapped[int] = mapped_column(ForeignKey("pieces.id", ondelete="CASCADE"), primary_key=True)
    object_id: Mapped[int] = mapped_column(ForeignKey("objects.id", ondelete="CASCADE"), primary_key=True,
                                           index=True)


class Deal(Base):
    """One storage deal of one piece with one provider, from Ferry's choice to its end.
    Ferry never records a deal it did not propose; `active` is set from the chain."""

    __tablename__ = "deals"
    __table_args__ = (Index("ix_deals_state", "state"), Index("ix_deals_piece", "piece_id"))

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    piece_id: Mapped[int] = mapped_column(ForeignKey("pieces.id"))
    backend: Mapped[str] = mapped_column(String(63))
    provider: Mapped[str] = mapped_column(String(32))
    client: Mapped[str] = mapped_column(String(128))
    state: Mapped[DealState] = mapped_column(_enum(DealState, "deal_state"))
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    price_per_epoch: Mapped[int | None] = mapped_column(BigInteger)  # attoFIL, as proposed
    duration: Mapped[int] = mapped_column(BigInteger)                # epochs
    start_epoch: Mapped[int | None] = mapped_column(BigInteger)
    end_epoch: Mapped[int | None] = mapped_column(BigInteger)
    sector_start_epoch: Mapped[int | None] = mapped_column(BigInteger)
    chain_deal_id: Mapped[int | None] = mapped_column(BigInteger)
    proposal_id: Mapped[str | None] = mapped_column(String(128))
    token_hash: Mapped[str | None] = mapped_column(String(64))  # sha256 of the piece-fetch token
    attempt: Mapped[int] = mapped_column(Integer, default=1)    # 1 + retries before it for this copy
    retry_of: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    renewal_of: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    schedule: Mapped[str | None] = mapped_column(String(63))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    proposed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DealSchedule(Base):
    """A standing order for deals, like Singularity's schedules: each cron run makes up
    to `deals_per_run` deals of the selected objects, within its pending and total caps."""

    __tablename__ = "deal_schedules"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    backend: Mapped[str] = mapped_column(String(63))
    spec: Mapped[dict[str, Any]] = mapped_column()  # selection, copies, cron, caps (api.schemas)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    next_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SearchDocument(Base):
    """An object's entry in the search indexes: the text extracted from it and how.
    `fingerprint` covers everything the entry was made from (content, name, tags, metadata,
    extractor, model, chunking): indexing an object whose fingerprint is unchanged does
    nothing. `stale` is set when the object's labels change, for the reconcile pass."""

    __tablename__ = "search_documents"

    object_id: Mapped[int] = mapped_column(ForeignKey("objects.id", ondelete="CASCADE"), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    stale: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    name: Mapped[str | None] = mapped_column(String(1024))
    title: Mapped[str | None] = mapped_column(Text)
    media_type: Mapped[str] = mapped_column(String(255))
    metadata_only: Mapped[bool] = mapped_column(Boolean, default=False)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)       # the extracted text, as chunked
    chunks: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(255))
    source_backend: Mapped[str | None] = mapped_column(String(63))  # the replica it was read from
    indexed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class SearchChunk(Base):
    """A stretch of a document's text: its full-text vector (Postgres; FTS5's `search_fts`
    on SQLite, kept by triggers) and its embedding. The id is the vector's id in the FAISS
    index and is never reused (Postgres identity; AUTOINCREMENT on SQLite), so a snapshot
    can never map an old vector to a new chunk."""

    __tablename__ = "search_chunks"
    __table_args__ = (
        Index("ix_search_chunks_tsv", "tsv", postgresql_using="gin"),
        # The owners of a vector search's nearest chunks, read from the index alone.
        Index("ix_search_chunks_id_owner", "id", postgresql_include=["object_id"]).ddl_if(dialect="postgresql"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    object_id: Mapped[int] = mapped_column(ForeignKey("objects.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)
    # float32 little-endian, normalised (inner product = cosine)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Weighted: name/title A, tags B, metadata and body C. Always NULL on SQLite.
    tsv: Mapped[Any] = mapped_column(TSVECTOR().with_variant(Text(), "sqlite"), nullable=True)


class SearchIndexState(Base):
    """The vector index's latest snapshot: processes holding an older generation reload."""

    __tablename__ = "search_index_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # always 1
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    snapshot: Mapped[str | None] = mapped_column(String(255))  # file name in FERRY_SEARCH_DIR
    vectors: Mapped[int] = mapped_column(Integer, default=0)
    dim: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str | None] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
