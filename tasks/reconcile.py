"""The reconcile loop: one pass, driven by Celery beat (`ferry.reconcile`).

A pass, in one transaction:
1. housekeeping of jobs: items whose worker died (expired lease) or whose message may
   be lost (queued too long) are sent again; listings that never ran are started again;
   running jobs whose items are all final are ended;
2. schedules: a policy's run opens when its cron or interval fires (or `ferry policy run`)
   and closes when a pass finds nothing left to do for it, or its window ends;
3. the diff, range of object ids by range of object ids (policies/planner.py): repairs
   of bad and missing replicas and re-checks of suspect ones (always: healing is never
   held back by a schedule), then, for each policy with an open run, the copies, deletes
   and verifications it is missing; for the others, only copies of objects below their
   `min` replicas (an object at risk does not wait for a window). Found work becomes items of one `reconcile` job,
   inserted as it is found, so a later query of the same pass sees it in flight;
4. objects with no verified replica left are marked lost and an alert is raised.

Messages go out after the pass commits. Passes never overlap (an advisory lock on
Postgres; SQLite's write lock), and each backend's work in flight stays under its cap.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ferry.catalog import jobs as catalog
from ferry.catalog import policies as stored
from ferry.catalog.db import after_commit, transaction
from ferry.catalog.models import (
    OPEN_ITEM_STATES,
    SEARCH_INDEX,
    JobItem,
    JobKind,
    StoredObject,
    utcnow,
)
from ferry.catalog.models import Policy as PolicyRow
from ferry.errors import FerryError
from ferry.settings import get_settings
from policies import planner
from policies.schema import Policy
from tasks import metrics
from tasks.app import app, send_batches, send_expand

log = logging.getLogger(__name__)
PASS_LOCK = 0x46455252  # "FERR": Postgres advisory lock key of the reconcile pass


@app.task(name="ferry.reconcile")
def reconcile() -> dict[str, Any]:
    try:
        report = run_pass()
    except Exception:
        metrics.reconcile_pass("failed")
        raise
    metrics.reconcile_pass("skipped" if "skipped" in report else "done")
    return report


def run_pass(now: datetime | None = None) -> dict[str, Any]:
    settings = get_settings()
    now = now or utcnow()
    with transaction() as session:
        if not _lock(session):
            return {"skipped": "another pass is running"}
        report: dict[str, Any] = _housekeeping(session, now)
        rows, policies = _load_policies(session)
        running = [row for row in rows if _run_open(row, policies[row.name], now)]
        labels, by_cid = planner.backends()
        dialect = session.get_bind().dialect.name
        every = {name: planner.PolicyQueries(p, labels, dialect, now, by_cid) for name, p in policies.items()}
        active = [every[row.name] for row in running]
        waiting = [q for q in every.values()
                   if q not in active and q.stages is not None and q.policy.schedule.kind != "manual"]
        work = _Pass(session, _budgets(session, settings), now)
        lo, hi = planner.id_range(session)
        for start in range(lo, hi, settings.reconcile_batch_objects):
            end = min(hi, start + settings.reconcile_batch_objects)
            work.take(planner.rows(session, planner.repairs(start, end), limit=work.room()))
            work.take(planner.rows(session, planner.suspects(start, end), limit=work.room()))
            work.mark_lost(start, end)
            for q in active:
                if q.policy.name in work.failed:
                    continue
                with work.isolated(q.policy.name):
                    name = q.policy.name
                    work.take(planner.rows(session, q.copies(start, end), limit=work.room(), policy=name))
                    deletes = planner.rows(session, q.surplus(start, end), limit=work.room(), policy=name)
                    deletes += planner.rows(session, q.expired(start, end), limit=work.room(), policy=name)
                    others = [o for o in every.values() if o is not q]
                    keep = planner.protected(session, others, deletes)
                    work.take([d for d in deletes if (d.object_id, d.dest_backend) not in keep])
                    work.take(planner.rows(session, q.verifications(start, end), limit=work.room(), policy=name))
                    work.take(planner.rows(session, q.deals(start, end), limit=work.room(), policy=name))
                    work.take(planner.rows(session, q.indexing(start, end), limit=work.room(), policy=name))
            for q in waiting:  # outside a cron/interval window, objects below `min` are still brought up to it
                if q.policy.name in work.failed:
                    continue
                with work.isolated(q.policy.name):
                    work.take(planner.rows(session, q.copies(start, end, urgent_only=True), limit=work.room(),
                                           policy=q.policy.name))
        open_by_policy = _open_items_by_policy(session)
        for row in running:
            if row.name in work.failed:
                continue
            if work.found[row.name] == 0 and open_by_policy.get(row.name, 0) == 0:
                row.converged_at = now
                if row.run_started_at is not None:
                    log.info("policy %s: converged; run closed", row.name)
                row.run_started_at = None
            row.last_pass_at = now
        batches = work.finish()
        after_commit(session, lambda: send_batches(batches))
        report.update(work.report())
    return report


def _load_policies(session: Session) -> tuple[list[PolicyRow], dict[str, Policy]]:
    """The policies in force; one whose stored document no longer validates (written by
    another version of Ferry) is skipped with an event, never stopping the pass."""
    rows, policies = [], {}
    for row in stored.active(session):
        try:
            policies[row.name] = Policy.from_dict(row.document)
        except FerryError as exc:
            log.error("policy %s: stored document is invalid (%s); skipped", row.name, exc.message)
            stored.raise_event(session, "policy.failed", "error", f"policy {row.name}: invalid document: "
                               f"{exc.message}", policy=row.name, quiet_for=timedelta(hours=1))
            continue
        rows.append(row)
    return rows, policies


def _lock(session: Session) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        return True  # SQLite: the pass's transaction holds the database's one write lock
    return bool(session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": PASS_LOCK}).scalar())


def _housekeeping(session: Session, now: datetime) -> dict[str, Any]:
    settings = get_settings()
    requeue_after = timedelta(seconds=settings.requeue_after_seconds)
    stalled = catalog.requeue_stalled(session, now=now, requeue_after=requeue_after)
    by_dest: dict[tuple, list[int]] = defaultdict(list)
    for job_id, seq, backend in stalled:
        by_dest[(job_id, backend)].append(seq)
    batches = [
        catalog.Batch(job_id, backend, catalog.spans_of(seqs[i:i + settings.batch_items]))
        for (job_id, backend), seqs in by_dest.items()
        for i in range(0, len(seqs), settings.batch_items)
    ]
    after_commit(session, lambda: send_batches(batches))
    listings = [(str(j.id), j.source_backend)
                for j in catalog.stalled_expansions(session, now=now, requeue_after=requeue_after)]
    after_commit(session, lambda: [send_expand(*listing) for listing in listings])
    ended = sum(1 for jid in catalog.finished_running_jobs(session) if catalog.finish_if_complete(session, jid))
    return {"requeued_items": len(stalled), "relisted_jobs": len(listings), "ended_jobs": ended}


def _run_open(row: PolicyRow, policy: Policy, now: datetime) -> bool:
    """Whether the policy's work may be planned in this pass; opens and closes runs."""
    schedule = policy.schedule
    if schedule.kind == "continuous":
        return True
    if row.run_started_at is not None and schedule.window is not None and now > row.run_started_at + schedule.window:
        log.warning("policy %s: its window (%s) closed before it converged", row.name, schedule.window)
        row.run_started_at = None
    if row.run_started_at is None and row.next_run_at is not None and now >= row.next_run_at:
        row.run_started_at = now
        log.info("policy %s: scheduled run opens", row.name)
    if row.next_run_at is None or now >= row.next_run_at:
        row.next_run_at = schedule.next_run_after(now)
    return row.run_started_at is not None


def _budgets(session: Session, settings: Any) -> dict[str, int]:
    """Room left under each backend's cap on work queued or running."""
    busy = dict(session.execute(
        select(JobItem.dest_backend, func.count()).where(JobItem.state.in_(OPEN_ITEM_STATES))
        .group_by(JobItem.dest_backend)).all())
    budgets = {name: (spec.max_in_flight or settings.max_in_flight) - busy.get(name, 0)
               for name, spec in settings.backends().items()}
    budgets[SEARCH_INDEX] = settings.max_in_flight - busy.get(SEARCH_INDEX, 0)  # the index queue's
    return budgets


def _open_items_by_policy(session: Session) -> dict[str, int]:
    return dict(session.execute(
        select(JobItem.policy, func.count()).where(JobItem.state.in_(OPEN_ITEM_STATES), JobItem.policy.is_not(None))
        .group_by(JobItem.policy)).all())


class _Pass:
    """The work one pass has found, written as items of one job as it comes."""

    def __init__(self, session: Session, budgets: dict[str, int], now: datetime):
        self.session, self.budgets, self.now = session, budgets, now
        self.job = None
        self.seq = 0
        self.batches: list[catalog.Batch] = []
        self.found: dict[str, int] = defaultdict(int)  # by policy, before caps
        self.tally: dict[str, int] = defaultdict(int)
        self.deferred = 0
        self.lost: list[str] = []
        self.failed: set[str] = set()  # policies whose queries failed in this pass

    @contextmanager
    def isolated(self, policy: str) -> Iterator[None]:
        """Run one policy's part of the pass in a savepoint: if it fails (a bug, a query
        the database refuses), its work is dropped, an event says so, and healing and the
        other policies go on."""
        saved = (self.job, self.seq, len(self.batches), dict(self.budgets), dict(self.tally),
                 dict(self.found), self.deferred)
        try:
            with self.session.begin_nested():
                yield
        except SQLAlchemyError as exc:
            (self.job, self.seq, nbatches, self.budgets, tally, found, self.deferred) = saved
            del self.batches[nbatches:]
            self.tally, self.found = defaultdict(int, tally), defaultdict(int, found)
            self.failed.add(policy)
            log.exception("policy %s: its reconcile queries failed; skipped in this pass", policy)
            stored.raise_event(self.session, "policy.failed", "error",
                               f"policy {policy}: reconcile failed: {type(exc).__name__}: {exc}"[:2000],
                               policy=policy, quiet_for=timedelta(hours=1))

    def room(self) -> int:
        return max(0, sum(max(0, b) for b in self.budgets.values()))

    def take(self, work: list[planner.Work]) -> None:
        if not work:
            return
        items = []
        for w in work:
            if w.policy:
                self.found[w.policy] += 1
            if self.budgets.get(w.dest_backend, 0) <= 0:
                self.deferred += 1
                continue
            self.budgets[w.dest_backend] -= 1
            self.tally[f"{w.action.value}:{w.reason}"] += 1
            items.append(catalog.NewItem(w.source_key or w.dest_key, w.dest_backend, w.dest_key, w.size,
                                         action=w.action, source_backend=w.source_backend,
                                         object_id=w.object_id, policy=w.policy))
        if not items:
            return
        if self.job is None:
            self.job = catalog.create_job(self.session, kind=JobKind.reconcile, source_backend=None,
                                          spec={"pass_at": self.now.isoformat()}, expand=True)
        items.sort(key=lambda it: it.dest_backend)
        settings = get_settings()
        self.batches += catalog.add_items(self.session, self.job.id, self.seq, items,
                                          batch_items=settings.batch_items, batch_bytes=settings.batch_bytes)
        self.seq += len(items)
        self.session.flush()

    def mark_lost(self, lo: int, hi: int) -> None:
        """Objects left without a verified replica: marked, alerted, never deleted."""
        lost = self.session.execute(planner.newly_lost(lo, hi)).all()
        if lost:
            self.session.execute(update(StoredObject).where(StoredObject.id.in_([r.id for r in lost]))
                                 .values(lost_at=self.now).execution_options(synchronize_session=False))
            for r in lost:
                log.error("object %s is LOST: no verified replica is left to repair it from; nothing deleted", r.cid)
                stored.raise_event(self.session, "object.lost", "critical",
                                   f"object {r.cid} lost: every replica is bad or missing", cid=r.cid)
                self.lost.append(r.cid)
        found = [r.id for r in self.session.execute(planner.found_again(lo, hi))]
        if found:
            self.session.execute(update(StoredObject).where(StoredObject.id.in_(found)).values(lost_at=None)
                                 .execution_options(synchronize_session=False))

    def finish(self) -> list[catalog.Batch]:
        if self.job is not None:
            catalog.mark_expanded(self.session, self.job, self.seq)
        return self.batches

    def report(self) -> dict[str, Any]:
        return {"job": str(self.job.id) if self.job else None, "items": self.seq, "work": dict(self.tally),
                "deferred_by_cap": self.deferred, "lost": len(self.lost), "failed_policies": sorted(self.failed)}
