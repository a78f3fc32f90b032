"""Queries that record what is stored where: objects, replicas and their states."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from ferry.catalog.db import dialect_insert
from ferry.catalog.models import Backend, Replica, ReplicaState, StoredObject, utcnow
from ferry.errors import ObjectNotFound
from ferry.settings import BackendSpec


@dataclass(frozen=True, slots=True)
class ReplicaFact:
    """What a worker established about one key on one backend."""

    backend: str
    key: str
    state: ReplicaState
    cid: str            # the object stored there
    sha256: str
    size: int
    verified: bool = False
    error: str | None = None


def sync_backends(session: Session, specs: Mapping[str, BackendSpec]) -> None:
    """Mirror the configured backends into the catalog (references only, never secrets)."""
    now = utcnow()
    rows = [{"name": s.name, "driver": s.driver, "labels": dict(s.labels),
             "settings": dict(s.settings), "created_at": now, "updated_at": now}
            for s in specs.values()]
    if not rows:
        return
    stmt = dialect_insert(session, Backend)
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"],
        set_={"driver": stmt.excluded.driver, "labels": stmt.excluded.labels,
              "settings": stmt.excluded.settings, "updated_at": stmt.excluded.updated_at},
    )
    session.execute(stmt, rows)


def ensure_objects(session: Session, digests: Iterable[tuple[str, str, int]]) -> dict[str, int]:
    """Insert (cid, sha256, size) objects not yet known; return object ids by CID."""
    rows = {cid: {"cid": cid, "sha256": sha, "size": size, "meta": {}, "tags": [],
                  "created_at": utcnow()} for cid, sha, size in digests}
    if not rows:
        return {}
    session.execute(dialect_insert(session, StoredObject).on_conflict_do_nothing(index_elements=["cid"]),
                    list(rows.values()))
    found = session.execute(select(StoredObject.cid, StoredObject.id).where(StoredObject.cid.in_(rows)))
    return {cid: oid for cid, oid in found}


def record(session: Session, facts: Sequence[ReplicaFact]) -> dict[str, int]:
    """Upsert objects and replicas from facts in two bulk statements; return object ids by CID."""
    if not facts:
        return {}
    # One statement may not upsert a row twice: the last fact about a location wins.
    facts = list({(f.backend, f.key): f for f in facts}.values())
    ids = ensure_objects(session, {(f.cid, f.sha256, f.size) for f in facts})
    now = utcnow()
    rows = [{"backend": f.backend, "key": f.key, "state": f.state, "object_id": ids[f.cid],
             "last_error": f.error, "updated_at": now, "created_at": now,
             "verified_at": now if f.verified else None} for f in facts]
    stmt = dialect_insert(session, Replica)
    stmt = stmt.on_conflict_do_update(
        index_elements=["backend", "key"],
        set_={"object_id": stmt.excluded.object_id, "state": stmt.excluded.state,
              "last_error": stmt.excluded.last_error, "updated_at": stmt.excluded.updated_at,
              "verified_at": stmt.excluded.verified_at},
    )
    session.execute(stmt, rows)
    return ids


def replicas_at(session: Session, locations: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Replica]:
    """Known replicas at (backend, key) locations, with their objects."""
    by_backend: dict[str, set[str]] = {}
    for backend, key in locations:
        by_backend.setdefault(backend, set()).add(key)
    found: dict[tuple[str, str], Replica] = {}
    for backend, keys in by_backend.items():
        ordered = sorted(keys)
        for i in range(0, len(ordered), 1000):
            # backend = ? AND key IN (...): an index range per key on (backend, key).
            for r in session.scalars(
                select(Replica).options(selectinload(Replica.object))
                .where(Replica.backend == backend, Replica.key.in_(ordered[i:i + 1000]))
            ):
                found[(r.backend, r.key)] = r
    return found


def get_object(session: Session, cid: str) -> StoredObject:
    obj = session.scalar(
        select(StoredObject).options(selectinload(StoredObject.replicas)).where(StoredObject.cid == cid)
    )
    if obj is None:
        raise ObjectNotFound(f"no object with CID {cid!r} in the catalog")
    return obj

