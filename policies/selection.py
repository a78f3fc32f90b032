"""A policy's selector and placement, in SQL.

`matches` turns a selector into a WHERE clause on `objects`; `Stages` turns placement
and transitions into the backends each object's requirement points at, as a small
derived table joined in the reconcile queries. Both render on Postgres and SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    String,
    and_,
    case,
    exists,
    func,
    literal,
    select,
    true,
    union_all,
)
from sqlalchemy.sql import Subquery

from ferry.catalog.filters import has_metadata, has_tags, media_type_is
from ferry.catalog.models import Replica, StoredObject
from ferry.catalog.replicas import under_prefix
from policies.schema import LabelExpr, Policy

OBJ = StoredObject.__table__.c
REP = Replica.__table__.c


def matches(policy: Policy, dialect: str, now: datetime) -> ColumnElement[bool]:
    """The objects the policy's selector governs (objects already lost are left to ops)."""
    s = policy.selector
    clauses: list[ColumnElement[bool]] = []
    if s.tags:
        clauses.append(has_tags(dialect, s.tags))
    if s.metadata:
        clauses.append(has_metadata(dialect, s.metadata))
    if s.backend is not None or s.prefix:
        # Where the object is or was stored: a policy keeps governing what it moved away.
        where = [REP.object_id == OBJ.id]
        if s.backend is not None:
            where.append(REP.backend == s.backend)
        if s.prefix:
            where.append(under_prefix(REP.key, s.prefix))
        clauses.append(exists(select(1).select_from(Replica.__table__).where(*where)))
    if s.size is not None:
        if s.size.min is not None:
            clauses.append(OBJ.size >= s.size.min)
        if s.size.max is not None:
            clauses.append(OBJ.size <= s.size.max)
    if s.media_type:
        clauses.append(media_type_is(s.media_type))
    if s.age is not None:
        if s.age.min is not None:
            clauses.append(OBJ.created_at <= now - s.age.min)
        if s.age.max is not None:
            clauses.append(OBJ.created_at >= now - s.age.max)
    return and_(true(), *clauses)


@dataclass(frozen=True)
class Stage:
    """One step of a placement: from `after` on, the requirement points at `backends`."""

    index: int
    backends: list[str]          # eligible backends, sorted
    expr: LabelExpr


class Stages:
    """A policy's placement over time: stage 0 is `placement.backends`, stage k the k-th
    transition's target. Each backend of a stage belongs to a failure domain (the value of
    the spread label; a backend without one is a domain of its own)."""

    def __init__(self, policy: Policy, backend_labels: dict[str, dict[str, Any]], now: datetime):
        assert policy.placement is not None
        self.policy = policy
        placement = policy.placement
        exprs = [placement.backends] + [t.to for t in policy.transitions]
        self.stages = [Stage(k, expr.select(backend_labels), expr) for k, expr in enumerate(exprs)]
        self.spread = placement.spread
        self.labels = backend_labels
        self.now = now

    def domain(self, backend: str) -> str:
        if self.spread:
            value = self.labels.get(backend, {}).get(self.spread)
            if value is not None:
                return f"{self.spread}={value}"
        return f"backend={backend}"

    def stage_of(self) -> ColumnElement[int]:
        """The stage each object is in, from its age (since access or creation)."""
        whens = []
        for k, t in reversed(list(enumerate(self.policy.transitions, start=1))):
            since = OBJ.created_at if t.since == "creation" else func.coalesce(OBJ.last_accessed_at, OBJ.created_at)
            whens.append((since <= self.now - t.after, k))
        if not whens:
            return literal(0, Integer)
        return case(*whens, else_=0)

    def table(self, name: str) -> Subquery | None:
        """(stage, backend, domain, brank, drank) rows; ranks rotate choices over objects.
        None when no stage has a backend."""
        rows = []
        for st in self.stages:
            domains = sorted({self.domain(b) for b in st.backends})
            for i, b in enumerate(st.backends):
                rows.append((st.index, b, self.domain(b), i, domains.index(self.domain(b))))
        if not rows:
            return None
        selects = [
            select(literal(s, Integer).label("stage"), literal(b, String).label("backend"),
                   literal(d, String).label("domain"), literal(bi, Integer).label("brank"),
                   literal(di, Integer).label("drank"))
            for s, b, d, bi, di in rows
        ]
        return (selects[0] if len(selects) == 1 else union_all(*selects)).subquery(name)

    def domain_counts(self) -> dict[int, int]:
        return {st.index: len({self.domain(b) for b in st.backends}) for st in self.stages}
