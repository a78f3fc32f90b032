"""Queries that record what is stored where: objects, replicas and their states."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Row, select, text
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
    now = utcnow()
    rows = sorted({cid: (cid, sha, size) for cid, sha, size in digests}.values())
    if not rows:
        return {}
    table = StoredObject.__table__
    if _postgres(session):
        # One statement over arrays instead of one per row: this runs for every batch.
        session.execute(text(
            "INSERT INTO objects (cid, sha256, size, metadata, tags, created_at) "
            "SELECT c, s, z, '{}'::json, '[]'::json, :now "
            "FROM unnest(CAST(:cids AS text[]), CAST(:shas AS text[]), CAST(:sizes AS bigint[])) AS t(c, s, z) "
            "ON CONFLICT (cid) DO NOTHING"),
            {"cids": [r[0] for r in rows], "shas": [r[1] for r in rows], "sizes": [r[2] for r in rows], "now": now})
    else:
        session.execute(dialect_insert(session, table).on_conflict_do_nothing(index_elements=["cid"]),
                        [{"cid": c, "sha256": sh, "size": z, "metadata": {}, "tags": [], "created_at": now}
                         for c, sh, z in rows])
    ids: dict[str, int] = {}
    cids = [r[0] for r in rows]
    for i in range(0, len(cids), 1000):
        found = session.execute(select(table.c.cid, table.c.id).where(table.c.cid.in_(cids[i:i + 1000])))
        ids.update({cid: oid for cid, oid in found})
    return ids


def record(session: Session, facts: Sequence[ReplicaFact]) -> dict[str, int]:
    """Upsert objects and replicas from facts in bulk; return object ids by CID."""
    if not facts:
        return {}
    # One statement may not upsert a row twice: the last fact about a location wins.
    facts = list({(f.backend, f.key): f for f in facts}.values())
    # Sorted, so concurrent workers lock rows in the same order and cannot deadlock.
    facts.sort(key=lambda f: (f.backend, f.key))
    ids = ensure_objects(session, {(f.cid, f.sha256, f.size) for f in facts})
    now = utcnow()
    if _postgres(session):
        session.execute(text(
            "INSERT INTO replicas (backend, key, state, object_id, last_error, created_at, updated_at, verified_at) "
            "SELECT b, k, s, o, e, :now, :now, CASE WHEN v THEN CAST(:now AS timestamptz) END "
            "FROM unnest(CAST(:backends AS text[]), CAST(:keys AS text[]), CAST(:states AS text[]), "
            "CAST(:objects AS bigint[]), CAST(:errors AS text[]), CAST(:verified AS boolean[])) "
            "AS t(b, k, s, o, e, v) "
            "ON CONFLICT (backend, key) DO UPDATE SET object_id = excluded.object_id, state = excluded.state, "
            "last_error = excluded.last_error, updated_at = excluded.updated_at, verified_at = excluded.verified_at"),
            {"backends": [f.backend for f in facts], "keys": [f.key for f in facts],
             "states": [ReplicaState(f.state).value for f in facts], "objects": [ids[f.cid] for f in facts],
             "errors": [f.error for f in facts], "verified": [f.verified for f in facts], "now": now})
        return ids
    stmt = dialect_insert(session, Replica.__table__)
    stmt = stmt.on_conflict_do_update(
        index_elements=["backend", "key"],
        set_={"object_id": stmt.excluded.object_id, "state": stmt.excluded.state,
              "last_error": stmt.excluded.last_error, "updated_at": stmt.excluded.updated_at,
              "verified_at": stmt.excluded.verified_at},
    )
    session.execute(stmt, [{"backend": f.backend, "key": f.key, "state": f.state, "object_id": ids[f.cid],
                            "last_error": f.error, "updated_at": now, "created_at": now,
                            "verified_at": now if f.verified else None} for f in facts])
    return ids


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def replicas_at(session: Session, locations: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Row]:
    """Known replicas at (backend, key) locations: rows of backend, key, state, verified_at,
    object_id and the object's cid, sha256 and size (plain rows: this runs for every batch)."""
    by_backend: dict[str, set[str]] = {}
    for backend, key in locations:
        by_backend.setdefault(backend, set()).add(key)
    r, o = Replica.__table__.c, StoredObject.__table__.c
    columns = (r.backend, r.key, r.state, r.verified_at, r.object_id, o.cid, o.sha256, o.size)
    found: dict[tuple[str, str], Row] = {}
    for backend, keys in by_backend.items():
        ordered = sorted(keys)
        for i in range(0, len(ordered), 1000):
            # backend = ? AND key IN (...): an index range per key on (backend, key).
            for row in session.execute(
                select(*columns).join_from(Replica.__table__, StoredObject.__table__, r.object_id == o.id)
                .where(r.backend == backend, r.key.in_(ordered[i:i + 1000]))
            ):
                found[(row.backend, row.key)] = row
    return found


def get_object(session: Session, cid: str) -> StoredObject:
    obj = session.scalar(
        select(StoredObject).options(selectinload(StoredObject.replicas)).where(StoredObject.cid == cid)
    )
    if obj is None:
        raise ObjectNotFound(f"no object with CID {cid!r} in the catalog")
    return obj

