"""The difference between what policies require and what is stored, as SQL.

Each function here builds one set-based query over a range of object ids and returns
the work it finds as `Work` rows: copies to reach a placement, deletes of what a
transition left behind or retention expired, verifications that are due, repairs of
bad and missing replicas. Nothing here loops over objects in Python; the reconcile pass
(tasks/reconcile.py) runs these queries batch by batch in one transaction, inserts the
rows as job items (so the next query sees them as work in flight) and sends them.

The rules the queries keep:
- only a verified (`present`) replica counts, and only it is ever read from;
- at most one open or stuck work item per object and backend: work in flight is not
  planned twice, and a pass over a converged catalog finds nothing;
- a replica is deleted only when its replacements are verified and no other policy
  that matches the object still wants its backend (`protected`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    and_,
    case,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    union,
    union_all,
)
from sqlalchemy.orm import Session

from ferry.catalog.models import (
    BROKEN_REPLICA_STATES,
    LIVE_DEAL_STATES,
    OPEN_DEAL_STATES,
    SEARCH_INDEX,
    Deal,
    ItemAction,
    ItemState,
    JobItem,
    PieceObject,
    Replica,
    ReplicaState,
    SearchDocument,
    StoredObject,
)
from ferry.settings import get_settings
from policies.schema import Policy
from policies.selection import Stages, matches
from workers import registry

OBJ = StoredObject.__table__.c
REP = Replica.__table__.c
ITEM = JobItem.__table__.c

BLOCKING_ITEM_STATES = (ItemState.queued.value, ItemState.running.value, ItemState.stuck.value)
PRESENT = ReplicaState.present.value
GONE_OR_GOING = (ReplicaState.gone.value, ReplicaState.deleting.value)


@dataclass(frozen=True, slots=True)
class Work:
    """One item of work a pass found missing."""

    action: ItemAction
    object_id: int
    size: int
    dest_backend: str
    dest_key: str
    source_backend: str | None = None   # copy: read from here; delete: the verified replica kept
    source_key: str | None = None
    policy: str | None = None
    reason: str = ""                    # placement, transition, max, retention, verify, repair


def _blocked(object_id: ColumnElement, backend: ColumnElement) -> ColumnElement[bool]:
    """Work on this object and backend is already open or stuck."""
    return exists(select(1).select_from(JobItem.__table__).where(
        ITEM.object_id == object_id, ITEM.dest_backend == backend, ITEM.state.in_(BLOCKING_ITEM_STATES)))


def _best_source(ids: Any) -> Any:
    """Per object, its most recently verified good replica (pref = 1)."""
    return (
        select(REP.object_id, REP.backend, REP.key,
               func.row_number().over(partition_by=REP.object_id,
                                      order_by=(REP.verified_at.desc(), REP.backend)).label("pref"))
        .where(REP.state == PRESENT, REP.object_id.in_(select(ids)))
        .cte("src")
    )


def backends() -> tuple[dict[str, dict[str, Any]], frozenset[str]]:
    """The labels of the backends policies may place objects on (never a read-only one,
    such as a public gateway), and which of those are content-addressed (keyed by CID)."""
    labels, by_cid = {}, set()
    for name, spec in get_settings().backends().items():
        content_addressed, read_only = registry.traits(spec.driver)
        if not read_only:
            labels[name] = dict(spec.labels)
        if content_addressed:
            by_cid.add(name)
    return labels, frozenset(by_cid)


class PolicyQueries:
    """The queries of one policy over one range of object ids. A copy to a backend in
    `content_addressed` is keyed by the object's CID; elsewhere it keeps the source's key."""

    def __init__(self, policy: Policy, backend_labels: dict[str, dict[str, Any]], dialect: str, now: datetime,
                 content_addressed: frozenset[str] = frozenset()):
        self.policy = policy
        self.dialect = dialect
        self.now = now
        self.content_addressed = content_addressed
        self.stages = Stages(policy, backend_labels, now) if policy.placement else None

    def matched(self, lo: int, hi: int, *extra: ColumnElement[bool]) -> Any:
        stage = self.stages.stage_of() if self.stages else literal(0, Integer)
        return (
            select(OBJ.id, OBJ.size, stage.label("stage"))
            .where(OBJ.id >= lo, OBJ.id < hi, OBJ.lost_at.is_(None), matches(self.policy, self.dialect, self.now), *extra)
            .cte("m")
        )

    def _not_expired(self) -> list[ColumnElement[bool]]:
        """Objects this policy's retention has not expired (nothing is copied to be deleted)."""
        if self.policy.retention is None:
            return []
        return [or_(OBJ.created_at > self.now - self.policy.retention.delete_after, OBJ.legal_hold.is_(True))]

    def _want(self, stage: ColumnElement[int], count: int | None = None) -> ColumnElement[int]:
        """Replicas wanted in a stage: `desired` (or `count`), fewer if fewer failure domains exist."""
        assert self.stages is not None
        wanted = self.policy.placement.replicas.desired if count is None else count
        domains = self.stages.domain_counts()
        return case(*[(stage == k, min(wanted, n)) for k, n in domains.items()], else_=0)

    def copies(self, lo: int, hi: int, *, urgent_only: bool = False) -> Select | None:
        """Copies that bring each matched object up to its stage's wanted replicas; with
        `urgent_only`, only up to `min` (what a pass does outside the policy's window: an
        object below its minimum is at risk, and that is never held back)."""
        if self.stages is None:
            return None
        sb = self.stages.table("sb")
        if sb is None:
            return None
        m = self.matched(lo, hi, *self._not_expired())
        present = (select(m.c.id, sb.c.domain)
                   .select_from(m.join(Replica.__table__, REP.object_id == m.c.id)
                                .join(sb, and_(sb.c.stage == m.c.stage, sb.c.backend == REP.backend)))
                   .where(REP.state == PRESENT))
        # Copies open on this range of objects, read first through the partial index on open
        # work: joined object by object instead, the planner may scan every open item per object.
        copying = (select(ITEM.object_id, ITEM.dest_backend)
                   .where(ITEM.object_id >= lo, ITEM.object_id < hi, ITEM.state.in_(BLOCKING_ITEM_STATES),
                          ITEM.action == ItemAction.copy.value)
                   .cte("copying").prefix_with("MATERIALIZED", dialect="postgresql"))
        in_flight = (select(m.c.id, sb.c.domain)
                     .select_from(copying.join(m, m.c.id == copying.c.object_id)
                                  .join(sb, and_(sb.c.stage == m.c.stage, sb.c.backend == copying.c.dest_backend))))
        cur = union(present, in_flight).cte("cur")  # distinct (object, domain) held or coming
        have = select(cur.c.id, func.count().label("n")).group_by(cur.c.id).cte("have")
        n = func.coalesce(have.c.n, 0)
        want = self._want(m.c.stage, self.policy.placement.replicas.min if urgent_only else None)
        need = (select(m.c.id, m.c.size, m.c.stage, (want - n).label("k"))
                .select_from(m.outerjoin(have, have.c.id == m.c.id)).where(n < want).cte("need"))
        nb = max(len(st.backends) for st in self.stages.stages) or 1
        nd = max(self.stages.domain_counts().values()) or 1
        cand = (
            select(need.c.id, need.c.size, need.c.k, need.c.stage, sb.c.backend, sb.c.drank,
                   func.row_number().over(partition_by=(need.c.id, sb.c.domain),
                                          order_by=(need.c.id + sb.c.brank) % nb).label("in_domain"))
            .select_from(need.join(sb, sb.c.stage == need.c.stage))
            .where(~exists(select(1).select_from(cur).where(cur.c.id == need.c.id, cur.c.domain == sb.c.domain)),
                   ~_blocked(need.c.id, sb.c.backend))
            .cte("cand")
        )
        pick = (
            select(cand.c.id, cand.c.size, cand.c.k, cand.c.stage, cand.c.backend,
                   func.row_number().over(partition_by=cand.c.id, order_by=(cand.c.id + cand.c.drank) % nd)
                   .label("nth"))
            .where(cand.c.in_domain == 1)
            .cte("pick")
        )
        src = _best_source(need.c.id)
        other = Replica.__table__.alias("other")
        dest_key = src.c.key
        sources = pick.join(src, and_(src.c.object_id == pick.c.id, src.c.pref == 1))
        if self.content_addressed:
            sources = sources.join(StoredObject.__table__, OBJ.id == pick.c.id)
            dest_key = case((pick.c.backend.in_(sorted(self.content_addressed)), OBJ.cid), else_=src.c.key)
        return (
            select(literal(ItemAction.copy.value).label("action"), pick.c.id.label("object_id"), pick.c.size,
                   pick.c.backend.label("dest_backend"), dest_key.label("dest_key"),
                   src.c.backend.label("source_backend"), src.c.key.label("source_key"),
                   case((pick.c.stage > 0, "transition"), else_="placement").label("reason"))
            .select_from(sources)
            .where(pick.c.nth <= pick.c.k,
                   # never write over another object's replica at the same key
                   ~exists(select(1).select_from(other).where(
                       other.c.backend == pick.c.backend, other.c.key == dest_key,
                       other.c.object_id != pick.c.id, other.c.state.not_in(GONE_OR_GOING))))
        )

    def deals(self, lo: int, hi: int) -> Select | None:
        """Deal work (packed into pieces by the filecoin backend's worker) for matched objects
        held in fewer than `filecoin.copies` deals that are live or still in flight, read
        from their most recently verified replica elsewhere."""
        f = self.policy.filecoin
        if f is None:
            return None
        m = self.matched(lo, hi, *self._not_expired())
        d, po = Deal.__table__.c, PieceObject.__table__.c
        states = [s.value for s in OPEN_DEAL_STATES | LIVE_DEAL_STATES]
        dealt = (select(po.object_id, func.count(d.id).label("n"))
                 .select_from(PieceObject.__table__.join(Deal.__table__, d.piece_id == po.piece_id))
                 .where(po.object_id >= lo, po.object_id < hi, d.backend == f.backend, d.state.in_(states))
                 .group_by(po.object_id).cte("dealt"))
        src = (select(REP.object_id, REP.backend, REP.key,
                      func.row_number().over(partition_by=REP.object_id,
                                             order_by=(REP.verified_at.desc(), REP.backend)).label("pref"))
               .where(REP.state == PRESENT, REP.backend != f.backend, REP.object_id.in_(select(m.c.id)))
               .cte("dsrc"))
        return (
            select(literal(ItemAction.deal.value).label("action"), m.c.id.label("object_id"), m.c.size,
                   literal(f.backend).label("dest_backend"), literal("").label("dest_key"),
                   src.c.backend.label("source_backend"), src.c.key.label("source_key"),
                   literal("filecoin").label("reason"))
            .select_from(m.join(src, and_(src.c.object_id == m.c.id, src.c.pref == 1))
                         .outerjoin(dealt, dealt.c.object_id == m.c.id))
            .where(func.coalesce(dealt.c.n, 0) < f.copies, ~_blocked(m.c.id, literal(f.backend)))
        )

    def indexing(self, lo: int, hi: int) -> Select | None:
        """Index work (`index: true` in the selector) for matched objects with a verified
        replica and no search entry, or one made from labels that have changed since."""
        if not self.policy.selector.index:
            return None
        m = self.matched(lo, hi, *self._not_expired())
        doc = SearchDocument.__table__.c
        src = _best_source(m.c.id)
        return (
            select(literal(ItemAction.index.value).label("action"), m.c.id.label("object_id"), m.c.size,
                   literal(SEARCH_INDEX).label("dest_backend"), src.c.key.label("dest_key"),
                   src.c.backend.label("source_backend"), src.c.key.label("source_key"),
                   literal("index").label("reason"))
            .select_from(m.join(src, and_(src.c.object_id == m.c.id, src.c.pref == 1))
                         .outerjoin(SearchDocument.__table__, doc.object_id == m.c.id))
            .where(or_(doc.object_id.is_(None), doc.stale), ~_blocked(m.c.id, literal(SEARCH_INDEX)))
        )

    def verifications(self, lo: int, hi: int) -> Select | None:
        """Replicas of matched objects whose last verification is older than the interval."""
        if self.policy.verification is None:
            return None
        m = self.matched(lo, hi)
        due = self.now - self.policy.verification.every
        return (
            select(literal(ItemAction.verify.value).label("action"), REP.object_id, m.c.size,
                   REP.backend.label("dest_backend"), REP.key.label("dest_key"),
                   null().label("source_backend"), null().label("source_key"), literal("verify").label("reason"))
            .select_from(m.join(Replica.__table__, REP.object_id == m.c.id))
            .where(REP.state == PRESENT, or_(REP.verified_at.is_(None), REP.verified_at < due),
                   ~_blocked(REP.object_id, REP.backend))
        )

    def surplus(self, lo: int, hi: int) -> Select | None:
        """Replicas to delete because a transition left them behind (on an earlier stage's
        backends, not the current one's) or because the current stage holds more than `max`,
        of objects whose current stage holds all its wanted replicas, verified, with no copy
        in flight. Each names a verified replica it relies on, which the worker re-checks.

        Shaped for the converged case, where it finds nothing: a grouped count picks the few
        candidate objects first, and only those are ranked."""
        if self.stages is None:
            return None
        sb = self.stages.table("sb")
        if sb is None:
            return None
        m = self.matched(lo, hi)
        placed = (select(REP.object_id, REP.backend, REP.key, REP.verified_at, sb.c.drank, sb.c.domain)
                  .select_from(m.join(Replica.__table__, REP.object_id == m.c.id)
                               .join(sb, and_(sb.c.stage == m.c.stage, sb.c.backend == REP.backend)))
                  .where(REP.state == PRESENT).cte("placed"))
        held = (select(placed.c.object_id, func.count(func.distinct(placed.c.drank)).label("domains"),
                       func.count().label("n"))
                .group_by(placed.c.object_id).cte("held"))
        copying = exists(select(1).select_from(JobItem.__table__).where(
            ITEM.object_id == m.c.id, ITEM.action == ItemAction.copy.value, ITEM.state.in_(BLOCKING_ITEM_STATES)))
        current = select(sb.c.backend).where(sb.c.stage == m.c.stage).scalar_subquery()
        queries = []
        if self.policy.transitions:
            # The verified replica of the current stage a delete relies on (few rows reach here).
            keep = Replica.__table__.alias("keep")

            def kept(column: Any, obj: Any, stage: Any) -> Any:
                return (select(column).where(keep.c.object_id == obj, keep.c.state == PRESENT,
                                             keep.c.backend.in_(select(sb.c.backend).where(sb.c.stage == stage)))
                        .order_by(keep.c.verified_at.desc(), keep.c.backend).limit(1).scalar_subquery())

            behind = (select(m.c.id, m.c.size, m.c.stage, REP.backend, REP.key)
                      .select_from(m.join(Replica.__table__, REP.object_id == m.c.id)
                                   .join(held, held.c.object_id == m.c.id))
                      .where(m.c.stage > 0, held.c.domains >= self._want(m.c.stage), ~copying,
                             REP.backend.in_(select(sb.c.backend).where(sb.c.stage < m.c.stage)),
                             REP.backend.not_in(current), REP.state.not_in(GONE_OR_GOING))
                      .cte("behind"))
            queries.append(
                select(literal(ItemAction.delete.value).label("action"), behind.c.id.label("object_id"),
                       behind.c.size, behind.c.backend.label("dest_backend"), behind.c.key.label("dest_key"),
                       kept(keep.c.backend, behind.c.id, behind.c.stage).label("source_backend"),
                       kept(keep.c.key, behind.c.id, behind.c.stage).label("source_key"),
                       literal("transition").label("reason"))
                .where(~_blocked(behind.c.id, behind.c.backend)))
        cap = self.policy.placement.replicas.max
        over = (select(m.c.id, m.c.size).select_from(m.join(held, held.c.object_id == m.c.id))
                .where(held.c.n > cap, held.c.domains >= self._want(m.c.stage), ~copying).cte("over"))
        # Rank the candidates' verified replicas: one per failure domain first, so the ones
        # kept under `max` keep the spread.
        in_domain = (select(placed, over.c.size,
                            func.row_number().over(partition_by=(placed.c.object_id, placed.c.domain),
                                                   order_by=(placed.c.verified_at.desc(), placed.c.backend))
                            .label("dr"))
                     .select_from(placed.join(over, over.c.id == placed.c.object_id)).subquery("in_domain"))
        order = (in_domain.c.dr, in_domain.c.drank)
        ranked = (select(in_domain.c.object_id, in_domain.c.size, in_domain.c.backend, in_domain.c.key,
                         func.row_number().over(partition_by=in_domain.c.object_id, order_by=order).label("rank"),
                         func.first_value(in_domain.c.backend).over(partition_by=in_domain.c.object_id,
                                                                    order_by=order).label("keep_backend"),
                         func.first_value(in_domain.c.key).over(partition_by=in_domain.c.object_id,
                                                                order_by=order).label("keep_key"))
                  .subquery("ranked"))
        queries.append(
            select(literal(ItemAction.delete.value).label("action"), ranked.c.object_id, ranked.c.size,
                   ranked.c.backend.label("dest_backend"), ranked.c.key.label("dest_key"),
                   ranked.c.keep_backend.label("source_backend"), ranked.c.keep_key.label("source_key"),
                   literal("max").label("reason"))
            .where(ranked.c.rank > cap, ~_blocked(ranked.c.object_id, ranked.c.backend)))
        return queries[0] if len(queries) == 1 else union_all(*queries)

    def expired(self, lo: int, hi: int) -> Select | None:
        """Every replica of matched objects older than retention, unless under legal hold."""
        if self.policy.retention is None:
            return None
        cutoff = self.now - self.policy.retention.delete_after
        m = self.matched(lo, hi, OBJ.created_at <= cutoff, OBJ.legal_hold.is_(False))
        return (
            select(literal(ItemAction.delete.value).label("action"), REP.object_id, m.c.size,
                   REP.backend.label("dest_backend"), REP.key.label("dest_key"),
                   null().label("source_backend"), null().label("source_key"), literal("retention").label("reason"))
            .select_from(m.join(Replica.__table__, REP.object_id == m.c.id))
            .where(REP.state.not_in(GONE_OR_GOING), ~_blocked(REP.object_id, REP.backend))
        )

    def wanted(self, object_ids: Sequence[int]) -> Select | None:
        """(object, backend) pairs this policy still needs, among `object_ids`: the backends
        of each matched object's current stage, unless its retention has expired."""
        if self.stages is None:
            return None
        sb = self.stages.table("sb")
        if sb is None:
            return None
        extra = [OBJ.id.in_(object_ids)]
        if self.policy.retention is not None:
            extra.append(or_(OBJ.created_at > self.now - self.policy.retention.delete_after, OBJ.legal_hold.is_(True)))
        stage = self.stages.stage_of()
        return (select(OBJ.id, sb.c.backend)
                .select_from(StoredObject.__table__.join(sb, sb.c.stage == stage))
                .where(matches(self.policy, self.dialect, self.now), *extra))


def repairs(lo: int, hi: int) -> Select:
    """Bad and missing replicas, rewritten at the same key from a verified good replica
    (never from themselves). Not tied to any policy, and never held back by a schedule."""
    broken = [s.value for s in BROKEN_REPLICA_STATES]
    ids = select(REP.object_id).where(REP.state.in_(broken), REP.object_id >= lo, REP.object_id < hi)
    src = _best_source(ids.subquery().c.object_id)
    return (
        select(literal(ItemAction.copy.value).label("action"), REP.object_id, OBJ.size,
               REP.backend.label("dest_backend"), REP.key.label("dest_key"),
               src.c.backend.label("source_backend"), src.c.key.label("source_key"),
               literal("repair").label("reason"))
        .select_from(Replica.__table__.join(StoredObject.__table__, OBJ.id == REP.object_id)
                     .join(src, and_(src.c.object_id == REP.object_id, src.c.pref == 1)))
        .where(REP.state.in_(broken), REP.object_id >= lo, REP.object_id < hi, ~_blocked(REP.object_id, REP.backend))
    )


def suspects(lo: int, hi: int) -> Select:
    """Replicas a check could not confirm: verified again, whatever the schedule."""
    return (
        select(literal(ItemAction.verify.value).label("action"), REP.object_id, OBJ.size,
               REP.backend.label("dest_backend"), REP.key.label("dest_key"),
               null().label("source_backend"), null().label("source_key"), literal("verify").label("reason"))
        .select_from(Replica.__table__.join(StoredObject.__table__, OBJ.id == REP.object_id))
        .where(REP.state == ReplicaState.suspect.value, REP.object_id >= lo, REP.object_id < hi,
               ~_blocked(REP.object_id, REP.backend))
    )


def newly_lost(lo: int, hi: int) -> Select:
    """Objects not yet marked lost with no verified replica left but a bad or missing one,
    and no copy in flight: nothing is left to repair them from."""
    broken = [s.value for s in BROKEN_REPLICA_STATES]
    return (
        select(OBJ.id, OBJ.cid)
        .where(OBJ.id >= lo, OBJ.id < hi, OBJ.lost_at.is_(None),
               exists(select(1).select_from(Replica.__table__).where(REP.object_id == OBJ.id, REP.state.in_(broken))),
               ~exists(select(1).select_from(Replica.__table__).where(REP.object_id == OBJ.id, REP.state == PRESENT)),
               ~exists(select(1).select_from(JobItem.__table__).where(
                   ITEM.object_id == OBJ.id, ITEM.action == ItemAction.copy.value,
                   ITEM.state.in_((ItemState.queued.value, ItemState.running.value)))))
    )


def found_again(lo: int, hi: int) -> Select:
    """Objects marked lost that have a verified replica again (restored by hand, say)."""
    return select(OBJ.id).where(
        OBJ.id >= lo, OBJ.id < hi, OBJ.lost_at.is_not(None),
        exists(select(1).select_from(Replica.__table__).where(REP.object_id == OBJ.id, REP.state == PRESENT)))


def rows(session: Session, query: Select | None, *, limit: int | None = None,
         policy: str | None = None) -> list[Work]:
    if query is None or limit == 0:
        return []
    if limit is not None:
        query = query.limit(limit)
    return [Work(ItemAction(r.action), r.object_id, r.size, r.dest_backend, r.dest_key, r.source_backend,
                 r.source_key, policy, r.reason) for r in session.execute(query)]


def protected(session: Session, queries: Iterable[PolicyQueries], work: Sequence[Work]) -> set[tuple[int, str]]:
    """Of the deletes in `work`, the (object, backend) pairs some policy still wants."""
    ids = sorted({w.object_id for w in work})
    keep: set[tuple[int, str]] = set()
    for q in queries:
        for i in range(0, len(ids), 1000):
            query = q.wanted(ids[i:i + 1000])
            if query is not None:
                keep.update((oid, backend) for oid, backend in session.execute(query))
    return keep


def id_range(session: Session) -> tuple[int, int]:
    lo, hi = session.execute(select(func.min(OBJ.id), func.max(OBJ.id))).one()
    return (lo or 0), (hi or -1) + 1


def status(session: Session, q: PolicyQueries) -> dict[str, int]:
    """How the objects a policy matches stand: one aggregate query over the catalog."""
    stage = q.stages.stage_of() if q.stages else literal(0, Integer)
    m = (select(OBJ.id, OBJ.lost_at, stage.label("stage"))
         .where(matches(q.policy, q.dialect, q.now)).cte("m"))
    broken = [s.value for s in BROKEN_REPLICA_STATES]
    has_broken = exists(select(1).select_from(Replica.__table__).where(REP.object_id == m.c.id,
                                                                       REP.state.in_(broken)))

    def items_in(*states: str) -> ColumnElement[bool]:
        return exists(select(1).select_from(JobItem.__table__).where(ITEM.object_id == m.c.id,
                                                                     ITEM.state.in_(states)))

    ok = and_(m.c.lost_at.is_(None), ~has_broken)
    sb = q.stages.table("sb") if q.stages else None
    if sb is not None:
        held = (select(func.count(func.distinct(sb.c.domain)))
                .select_from(Replica.__table__.join(sb, sb.c.backend == REP.backend))
                .where(REP.object_id == m.c.id, REP.state == PRESENT, sb.c.stage == m.c.stage)
                .scalar_subquery())
        ok = and_(ok, held >= q._want(m.c.stage))

    def count(cond: ColumnElement[bool]) -> Any:
        return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

    row = session.execute(select(
        func.count().label("matched"),
        count(ok).label("converged"),
        count(items_in(ItemState.queued.value, ItemState.running.value)).label("replicating"),
        count(items_in(ItemState.stuck.value)).label("stuck"),
        count(and_(has_broken, m.c.lost_at.is_(None))).label("bad"),
        count(m.c.lost_at.is_not(None)).label("lost"),
    ).select_from(m)).one()
    return {k: int(v) for k, v in row._mapping.items()}


def plan(session: Session, q: PolicyQueries, others: Sequence[PolicyQueries], batch: int) -> dict[str, Any]:
    """What a run of the policy would enqueue now, without enqueueing it: objects and bytes
    to copy, move, delete and verify, by backend. Work already in flight is not counted."""
    out: dict[str, Any] = {verb: {"objects": 0, "bytes": 0, "backends": {}}
                           for verb in ("copy", "move", "delete", "verify")}

    def add(verb: str, backend: str, n: int, nbytes: int) -> None:
        out[verb]["objects"] += n
        out[verb]["bytes"] += nbytes
        per = out[verb]["backends"].setdefault(backend, {"objects": 0, "bytes": 0})
        per["objects"] += n
        per["bytes"] += nbytes

    lo, hi = id_range(session)
    for start in range(lo, hi, batch):
        end = min(hi, start + batch)
        for query in (q.copies(start, end), q.verifications(start, end)):
            if query is None:
                continue
            sub = query.subquery()
            for action, reason, backend, n, nbytes in session.execute(
                    select(sub.c.action, sub.c.reason, sub.c.dest_backend, func.count(),
                           func.coalesce(func.sum(sub.c.size), 0))
                    .group_by(sub.c.action, sub.c.reason, sub.c.dest_backend)):
                verb = "move" if reason == "transition" else "verify" if action == "verify" else "copy"
                add(verb, backend, n, int(nbytes))
        deletes = rows(session, q.surplus(start, end)) + rows(session, q.expired(start, end))
        keep = protected(session, others, deletes)
        for d in deletes:
            if (d.object_id, d.dest_backend) not in keep:
                add("delete", d.dest_backend, 1, d.size)
    return out
