"""Queries that record what is stored where: objects, replicas and their states."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, and_, bindparam, func, select, text, true, update
from sqlalchemy.orm import Session, selectinload

from ferry.catalog.db import dialect_insert
from ferry.catalog.models import (
    Backend,
    CheckResult,
    Replica,
    ReplicaCheck,
    ReplicaState,
    StoredObject,
    utcnow,
)
from ferry.errors import ObjectNotFound
from ferry.search import store as search_store
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


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of re-reading one replica."""

    backend: str
    key: str
    result: CheckResult
    bytes_read: int
    seconds: float
    error: str | None = None
    job_id: uuid.UUID | None = None


CHECK_STATE = {CheckResult.ok: ReplicaState.present, CheckResult.bad: ReplicaState.bad,
               CheckResult.missing: ReplicaState.missing}


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
        _unindex_removed(session, {ids[f.cid] for f in facts if f.state == ReplicaState.gone})
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
    _unindex_removed(session, {ids[f.cid] for f in facts if f.state == ReplicaState.gone})
    return ids


def _unindex_removed(session: Session, object_ids: set[int]) -> None:
    """Objects whose last replica is gone (deleted on purpose) leave the search indexes."""
    if not object_ids:
        return
    r = Replica.__table__.c
    kept = set(session.scalars(select(r.object_id).where(
        r.object_id.in_(object_ids), r.state.not_in([ReplicaState.gone, ReplicaState.deleting]))))
    search_store.remove(session, object_ids - kept)


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



def record_checks(session: Session, checks: Sequence[Check]) -> int:
    """Store verification outcomes: one `replica_checks` row each, and the replica's state
    (`present` and verified now, `bad` or `missing`). Returns how many replicas matched."""
    if not checks:
        return 0
    now = utcnow()
    r = Replica.__table__.c
    ids: dict[tuple[str, str], int] = {}
    by_backend: dict[str, list[str]] = {}
    for c in checks:
        by_backend.setdefault(c.backend, []).append(c.key)
    for backend, keys in by_backend.items():
        for i in range(0, len(keys), 1000):
            for rid, key in session.execute(select(r.id, r.key).where(r.backend == backend,
                                                                       r.key.in_(keys[i:i + 1000]))):
                ids[(backend, key)] = rid
    found = [c for c in checks if (c.backend, c.key) in ids]
    if not found:
        return 0
    session.connection().execute(
        update(Replica.__table__).where(r.id == bindparam("b_id"))
        .values(state=bindparam("b_state"), last_error=bindparam("b_error"), updated_at=now,
                verified_at=func.coalesce(bindparam("b_verified"), r.verified_at)),
        [{"b_id": ids[(c.backend, c.key)], "b_state": CHECK_STATE[c.result].value, "b_error": c.error,
          "b_verified": now if c.result == CheckResult.ok else None} for c in found])
    session.execute(ReplicaCheck.__table__.insert(), [
        {"replica_id": ids[(c.backend, c.key)], "job_id": c.job_id, "checked_at": now, "result": c.result.value,
         "bytes_read": c.bytes_read, "seconds": c.seconds, "error": c.error} for c in found])
    return len(found)


def verify_report(session: Session, job_id: uuid.UUID) -> dict:
    """What a verify job found: counts by result, and each bad or missing replica with
    what healing can do for it."""
    from ferry.catalog.models import ItemAction, ItemState, JobItem

    c, r, o = ReplicaCheck.__table__.c, Replica.__table__.c, StoredObject.__table__.c
    counts = {res.value: 0 for res in CheckResult}
    nbytes = 0
    for result, n, b in session.execute(select(c.result, func.count(), func.coalesce(func.sum(c.bytes_read), 0))
                                        .where(c.job_id == job_id).group_by(c.result)):
        counts[CheckResult(result).value] = n
        nbytes += int(b)
    good = select(1).select_from(Replica.__table__.alias("g")).where(
        text("g.object_id = replicas.object_id AND g.state = 'present'")).exists()
    i = JobItem.__table__.c
    repairing = select(1).select_from(JobItem.__table__).where(
        i.object_id == r.object_id, i.dest_backend == r.backend, i.action == ItemAction.copy.value,
        i.state.in_([ItemState.queued.value, ItemState.running.value])).exists()
    findings = []
    for backend, key, cid, result, error, lost, has_good, in_progress, state in session.execute(
            select(r.backend, r.key, o.cid, c.result, c.error, o.lost_at.is_not(None), good, repairing, r.state)
            .select_from(ReplicaCheck.__table__.join(Replica.__table__, r.id == c.replica_id)
                         .join(StoredObject.__table__, o.id == r.object_id))
            .where(c.job_id == job_id, c.result != CheckResult.ok.value).order_by(c.id).limit(1000)):
        healing = ("healed" if state == ReplicaState.present.value else "in_progress" if in_progress
                   else "lost" if lost or not has_good else "scheduled")
        findings.append({"backend": backend, "key": key, "cid": cid, "result": result, "error": error,
                         "healing": healing})
    return {"job_id": job_id, "checked": sum(counts.values()), "ok": counts["ok"], "bad": counts["bad"],
            "missing": counts["missing"], "bytes_read": nbytes,
            "healing_scheduled": sum(1 for f in findings if f["healing"] in ("scheduled", "in_progress", "healed")),
            "lost": sum(1 for f in findings if f["healing"] == "lost"), "findings": findings}


def label_objects(session: Session, object_ids: Iterable[int], *, tags: Sequence[str] = (),
                  remove_tags: Sequence[str] = (), metadata: Mapping[str, object] | None = None,
                  media_type: str | None = None) -> None:
    """Add (or remove) tags, merge metadata keys (a None value removes the key) and set the
    media type of objects: what policy selectors match on."""
    ids = sorted(set(object_ids))
    t = StoredObject.__table__.c
    for i in range(0, len(ids), 1000):
        rows = session.execute(select(t.id, t.tags, t.metadata).where(t.id.in_(ids[i:i + 1000]))).all()
        changes = []
        for oid, old_tags, old_meta in rows:
            new_tags = sorted((set(old_tags or []) | set(tags)) - set(remove_tags))
            new_meta = {**(old_meta or {}), **(metadata or {})}
            new_meta = {k: v for k, v in new_meta.items() if v is not None}
            changes.append({"b_id": oid, "b_tags": new_tags, "b_meta": new_meta})
        if changes:
            values = {"tags": bindparam("b_tags"), "metadata": bindparam("b_meta")}
            if media_type is not None:
                values["media_type"] = media_type
            session.connection().execute(update(StoredObject.__table__).where(t.id == bindparam("b_id"))
                                         .values(**values), changes)
    search_store.mark_stale(session, ids)  # their search entries were made from the old labels


def under_prefix(column: Any, prefix: str) -> Any:
    """`column` (an object key: code point order on both databases) starts with `prefix`: a
    range the (backend, key) index serves, then an exact, case-sensitive comparison (SQLite's
    LIKE ignores ASCII case, Postgres's uses no index outside the C collation)."""
    if not prefix:
        return true()
    return and_(column >= prefix, column < prefix + "\U0010ffff",
                func.substr(column, 1, len(prefix)) == prefix)
