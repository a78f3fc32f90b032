"""Tables and state enums of the catalog. The same models run on Postgres and SQLite."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

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
    bad = "bad"              # failed verification; counts as missing
    deleting = "deleting"    # removal decided and under way
    gone = "gone"            # removed from the backend


class JobKind(enum.StrEnum):
    migrate = "migrate"
    replicate = "replicate"


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


OPEN_ITEM_STATES = (ItemState.queued, ItemState.running)


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

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    cid: Mapped[str] = mapped_column(String(128), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str | None] = mapped_column(String(255))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    replicas: Mapped[list[Replica]] = relationship(back_populates="object", order_by="Replica.id")


class Replica(Base):
    """One object at one key on one backend, and what Ferry last knew of it."""

    __tablename__ = "replicas"
    __table_args__ = (UniqueConstraint("backend", "key", name="uq_replicas_backend_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    object_id: Mapped[int] = mapped_column(ForeignKey("objects.id", ondelete="CASCADE"), index=True)
    backend: Mapped[str] = mapped_column(ForeignKey("backends.name"))
    key: Mapped[str] = mapped_column(String(1024))
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
    source_backend: Mapped[str] = mapped_column(String(63))
    # The request as accepted: source keys or prefix, targets, options.
    spec: Mapped[dict[str, Any]] = mapped_column()
    total: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class JobItem(Base):
    """One object's work within a job: copy `source_key` to `dest_key` on `dest_backend`.

    Items are numbered 0..n-1 within their job, so a message names a span of items
    (`seq` from..to) instead of a list of ids.
    """

    __tablename__ = "job_items"
    __table_args__ = (
        Index("ix_job_items_job_state", "job_id", "state"),
        Index("ix_job_items_state_lease", "state", "lease_until"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
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
