"""The work verb (`ferry.transfer`): run a batch of job items, each one action.

- copy: source -> destination while hashing (checked against the object's sha256 when the
  catalog knows it: a corrupt source is marked bad and nothing from it is recorded), re-read
  the destination and compare, record both replicas verified; for a migrate, only then delete
  the source;
- delete: remove a replica, only while the replica it relies on is still verified (and, for
  retention, while the object is not under legal hold);
- verify: re-read and re-hash a replica, record the check (`bad`, `missing` or verified now).

Outcomes are written in bulk, one transaction per second of work at most, so progress shows
while a batch runs. Safe to run twice: items already finished are not claimed again, and a
copy already verified is skipped.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from ferry import logs
from ferry.catalog import jobs as catalog
from ferry.catalog.db import transaction
from ferry.catalog.models import (
    CheckResult,
    ItemAction,
    ItemState,
    Job,
    JobKind,
    ReplicaState,
    StoredObject,
)
from ferry.catalog.replicas import (
    Check,
    ReplicaFact,
    label_objects,
    record,
    record_checks,
    replicas_at,
)
from ferry.errors import BackendUnavailable, FerryError, KeyNotFound, UnknownBackend
from ferry.settings import get_settings
from tasks import metrics
from tasks.app import app, backoff, send_reconcile, send_spans
from workers import registry, transfer
from workers.base import Backend
from workers.cid import ContentHasher, Digest

log = logging.getLogger(__name__)
FLUSH_EVERY = 1.0  # seconds between progress commits within a batch
SMALL_OBJECT = 2**20  # objects up to this size may be copied several at once (FERRY_ITEM_THREADS)


@dataclass(frozen=True, slots=True)
class Item:
    seq: int
    action: ItemAction
    source_backend: str | None   # resolved: the item's own, else the job's
    source_key: str
    dest_backend: str
    dest_key: str
    size: int | None
    attempts: int
    object_id: int | None
    policy: str | None


@dataclass(frozen=True, slots=True)
class Plan:
    job_id: uuid.UUID
    kind: JobKind
    keep_source: bool
    tags: list[str]                 # added to every object this job copies
    items: list[Item]
    # What the catalog knows at the items' locations, in any state: sha256/size to compare
    # with, and whether the replica there is verified.
    known: dict[tuple[str, str], Digest]
    verified: set[tuple[str, str]]
    objects: dict[int, Digest]      # the objects reconcile items name, by id
    held: set[int]                  # of those, the ones under legal hold


# Set when this process is asked to stop (SIGTERM to a pool process, or the worker's warm
# shutdown, tasks/app.py): a batch under way finishes the items it has started, puts the
# rest back in the queue at once (a new message) and returns, well inside a grace period.
draining = threading.Event()


@app.task(name="ferry.transfer", bind=True, max_retries=None)
def transfer_items(self, job_id: str, spans: list[list[int]]) -> dict[str, int]:
    settings = get_settings()
    plan = _claim(uuid.UUID(job_id), [(lo, hi) for lo, hi in spans], settings.lease_seconds)
    if plan is None:
        return {"claimed": 0}
    started = time.monotonic()
    try:
        with logs.context(job=job_id, backend=plan.items[0].dest_backend):
            return _run(self, plan, settings)
    finally:
        metrics.batch_seconds(metrics.verb_of(plan), plan.items[0].dest_backend, time.monotonic() - started)


def _run(task: Any, plan: Plan, settings: Any) -> dict[str, int]:
    if all(i.action == ItemAction.deal for i in plan.items):
        from tasks import deals  # deal work is packed into pieces, a batch at a time

        return deals.run_batch(plan)
    if all(i.action == ItemAction.index for i in plan.items):
        from tasks.index import IndexRun  # text extracted and embedded a group at a time

        run: _BatchRun | IndexRun = IndexRun(plan, settings)
    else:
        run = _BatchRun(plan, settings.max_attempts, settings.item_threads)
    with _Heartbeat(plan.job_id, run, settings.lease_seconds):
        run.run()
    if run.tally.get("requeued"):
        log.warning("job %s: stopping: %d items of the batch not started, put back in the queue",
                    plan.job_id, run.tally["requeued"])
        send_spans(str(plan.job_id), plan.items[0].dest_backend, sorted(run.requeue_seqs))
    if run.retry_seqs:
        countdown = backoff(task.request.retries)
        log.warning("job %s: %d items hit a transient error; retrying in %.0fs",
                    plan.job_id, len(run.retry_seqs), countdown)
        raise task.retry(args=[str(plan.job_id), [list(s) for s in catalog.spans_of(sorted(run.retry_seqs))]],
                         countdown=countdown)
    if plan.kind == JobKind.verify and run.tally.get("finished_job"):
        send_reconcile()  # heal what the verification found, now rather than at the next beat
    return run.tally


def _claim(job_id: uuid.UUID, spans: list[catalog.Span], lease_seconds: int) -> Plan | None:
    with transaction() as session:
        job = session.get(Job, job_id)
        if job is None or job.state.terminal:
            return None
        rows = catalog.claim_items(session, job_id, spans, lease=timedelta(seconds=lease_seconds))
        if not rows:
            return None
        items = [Item(r.seq, ItemAction(r.action), r.source_backend or job.source_backend, r.source_key,
                      r.dest_backend, r.dest_key, r.size, r.attempts, r.object_id, r.policy) for r in rows]
        locations = [(i.source_backend, i.source_key) for i in items if i.source_backend]
        locations += [(i.dest_backend, i.dest_key) for i in items]
        at = replicas_at(session, locations)
        ids = {i.object_id for i in items if i.object_id is not None}
        o = StoredObject.__table__.c
        objects, held = {}, set()
        for oid, sha, size, cid, hold in session.execute(
                select(o.id, o.sha256, o.size, o.cid, o.legal_hold).where(o.id.in_(ids))) if ids else ():
            objects[oid] = Digest(size, sha, cid)
            if hold:
                held.add(oid)
        return Plan(job.id, job.kind, bool(job.spec.get("keep_source")), list(job.spec.get("tags", [])), items,
                    known={loc: Digest(r.size, r.sha256, r.cid) for loc, r in at.items()},
                    verified={loc for loc, r in at.items() if r.state == ReplicaState.present},
                    objects=objects, held=held)


class _BatchRun:
    """Works through a plan's items, buffering outcomes and committing them in bulk.

    Small objects (size known, at most SMALL_OBJECT) are copied by a few threads at once,
    so round trips to a remote store overlap; the rest go one at a time, which bounds
    memory to what one large transfer needs. Only the main thread writes the catalog.
    """

    def __init__(self, plan: Plan, max_attempts: int, threads: int):
        self.plan = plan
        self.max_attempts = max_attempts
        self.threads = threads
        self.settings = get_settings()
        self.backends: dict[str, Backend] = {}
        self.lock = threading.RLock()  # guards the buffers below, shared with item threads
        self.facts: list[ReplicaFact] = []
        self.checks: list[Check] = []
        self.outcomes: list[dict[str, Any]] = []
        self.to_delete: list[tuple[Item, Digest, ItemState]] = []
        self.retry_seqs: list[int] = []
        self.requeue_seqs: list[int] = []  # put back unstarted: the worker is stopping
        self.open_seqs = {i.seq for i in plan.items}
        self.in_flight: dict[int, ContentHasher] = {}  # copies under way, for progress
        self.tally = {"done": 0, "skipped": 0, "failed": 0, "stuck": 0, "retry": 0}
        self.cancelled = False
        self.last_flush = time.monotonic()

    @property
    def moves(self) -> bool:
        return self.plan.kind == JobKind.migrate and not self.plan.keep_source

    def run(self) -> None:
        with ThreadPoolExecutor(self.threads, thread_name_prefix="ferry-item") as pool:
            pending: set[Future] = set()
            for item in self.plan.items:
                if self.cancelled:
                    self._finish(item, ItemState.cancelled, error="job cancelled")
                    continue
                if draining.is_set():
                    self._put_back(item)
                    continue
                if item.size is not None and item.size <= SMALL_OBJECT and self.threads > 1:
                    pending.add(pool.submit(self._process, item))
                    while len(pending) >= self.threads:
                        pending = self._wait(pending)
                else:
                    self._process(item)
                self._maybe_flush()
            while pending:
                pending = self._wait(pending)
                self._maybe_flush()
        while self.facts or self.outcomes or self.to_delete or self.checks:
            self.flush()
        with transaction() as session:
            if catalog.finish_if_complete(session, self.plan.job_id):
                self.tally["finished_job"] = 1

    def _put_back(self, item: Item) -> None:
        """Not started, and this process is stopping: queued again, for another worker."""
        with self.lock:
            self.requeue_seqs.append(item.seq)
            self.tally["requeued"] = self.tally.get("requeued", 0) + 1
        self._finish(item, ItemState.queued, error=None)

    def _wait(self, pending: set[Future]) -> set[Future]:
        done, pending = wait(pending, timeout=FLUSH_EVERY, return_when=FIRST_COMPLETED)
        for future in done:
            future.result()  # _process handles every error; anything else is a bug to surface
        return pending

    def _maybe_flush(self) -> None:
        if time.monotonic() - self.last_flush >= FLUSH_EVERY:
            self.flush()

    def _backend(self, name: str) -> Backend:
        with self.lock:
            backend = self.backends.get(name)
            if backend is None:
                spec = self.settings.backends().get(name)
                if spec is None:
                    raise UnknownBackend(f"backend {name!r} is not configured on this worker")
                backend = self.backends[name] = registry.get(spec)
                if spec.driver == "filecoin":
                    from tasks.deals import attach_locator

                    attach_locator(backend)
            return backend

    def _process(self, item: Item) -> None:
        known = self.plan.known.get((item.source_backend or item.dest_backend, item.source_key))
        with logs.context(job=str(self.plan.job_id), item=item.seq, backend=item.dest_backend,
                          cid=known.cid if known is not None else None):
            self._process_item(item)

    def _process_item(self, item: Item) -> None:
        try:
            if item.action == ItemAction.verify:
                self._verify(item)
            elif item.action == ItemAction.delete:
                self._delete(item)
            else:
                self._copy(item)
        except BackendUnavailable as exc:
            if item.attempts < self.max_attempts:
                with self.lock:
                    self.retry_seqs.append(item.seq)
                    self.tally["retry"] += 1
                self._finish(item, ItemState.queued, error=f"attempt {item.attempts}: {exc.message}")
            else:
                self._finish(item, self._failed, error=f"gave up after {item.attempts} attempts: {exc.message}")
        except FerryError as exc:  # KeyNotFound, ChecksumMismatch, ...: the message names backend and key
            self._finish(item, self._failed, error=exc.message)
        except Exception as exc:  # a bug or an unmapped driver error: fail the item, keep the batch going
            log.exception("job %s item %d failed unexpectedly", self.plan.job_id, item.seq)
            self._finish(item, self._failed, error=f"internal error: {type(exc).__name__}: {exc}")

    @property
    def _failed(self) -> ItemState:
        """Reconcile work that keeps failing is `stuck`: no pass plans it again until retried."""
        return ItemState.stuck if self.plan.kind == JobKind.reconcile else ItemState.failed

    def _expected(self, item: Item, backend: str, key: str) -> Digest | None:
        if item.object_id is not None and item.object_id in self.plan.objects:
            return self.plan.objects[item.object_id]
        return self.plan.known.get((backend, key))

    def _copy(self, item: Item) -> None:
        plan = self.plan
        assert item.source_backend is not None
        src = self._backend(item.source_backend)
        dst = self._backend(item.dest_backend)
        expected = self._expected(item, item.source_backend, item.source_key)
        digest = self._already_there(item, src, dst)
        state = ItemState.skipped
        facts = []
        if digest is None:
            hasher = ContentHasher()
            with self.lock:
                self.in_flight[item.seq] = hasher
            stored: str | None = item.dest_key  # where bytes were stored (a CID on IPFS)
            try:
                digest = transfer.copy(src, item.source_key, dst, item.dest_key, size=item.size, hasher=hasher,
                                       expect_cid=expected.cid if expected is not None else None)
                stored = digest.cid if dst.content_addressed else item.dest_key
            except transfer.ContentDiffers as exc:
                # The source's bytes are not the CID they should make: on a content-addressed
                # destination nothing was kept; a keyed one was written and is removed below.
                digest, stored = exc.digest, None if dst.content_addressed else item.dest_key
                if expected is None or digest.sha256 == expected.sha256:
                    if stored and (item.dest_backend, stored) not in plan.known:
                        dst.delete(stored)
                    raise
            except KeyNotFound as exc:
                if expected is not None:  # the catalog had it there: that replica is missing
                    self._check(item.source_backend, item.source_key, CheckResult.missing, 0, str(exc.message))
                raise
            finally:
                with self.lock:
                    del self.in_flight[item.seq]
            if expected is not None and digest.sha256 != expected.sha256:
                # The source's bytes are not the object's: it is bad. What was written from it
                # is removed, never recorded, and the item fails so the next pass copies from a
                # good replica instead.
                self._check(item.source_backend, item.source_key, CheckResult.bad, digest.size,
                            f"sha256 {digest.sha256} read while copying, expected {expected.sha256}")
                if stored and (item.dest_backend, stored) not in plan.known:
                    dst.delete(stored)
                self._finish(item, ItemState.failed, error=(
                    f"source {item.source_backend}:{item.source_key} is corrupt (sha256 mismatch); "
                    "not copied, it will be copied from a good replica"))
                return
            if stored != item.dest_key:
                item = replace(item, dest_key=stored)
            transfer.verify(dst, item.dest_key, digest)
            state = ItemState.done
            if not src.read_only:  # a gateway's copy is not a replica Ferry keeps
                facts.append(self._fact(item.source_backend, item.source_key, digest, verified=True))
        facts.append(self._fact(item.dest_backend, item.dest_key, digest, verified=True))
        with self.lock:
            self.facts += facts
            if self.moves and not src.read_only:
                # The destination is verified; the source goes only after that is committed
                # (the deleting fact and the delete travel through the same flush). A read-only
                # source (a gateway) stays as it is: the migration is a copy from there.
                self.facts.append(self._fact(item.source_backend, item.source_key, digest,
                                             state=ReplicaState.deleting))
                self.to_delete.append((item, digest, state))
            else:
                self._finish(item, state, digest=digest)

    def _delete(self, item: Item) -> None:
        """Remove the replica at dest. A delete that relies on a kept replica (a transition's
        source) happens only while that replica is still verified; retention yields to a hold."""
        plan = self.plan
        if item.source_backend and (item.source_backend, item.source_key) not in plan.verified:
            self._finish(item, ItemState.skipped, error=(
                f"not deleted: the replica it relies on, {item.source_backend}:{item.source_key}, "
                "is no longer verified"))
            return
        if not item.source_backend and item.object_id in plan.held:
            self._finish(item, ItemState.skipped, error="not deleted: the object is under legal hold")
            return
        digest = self._expected(item, item.dest_backend, item.dest_key)
        self._backend(item.dest_backend).delete(item.dest_key)
        if digest is not None:
            with self.lock:
                self.facts.append(self._fact(item.dest_backend, item.dest_key, digest, state=ReplicaState.gone))
        self._finish(item, ItemState.done, digest=digest)

    def _verify(self, item: Item) -> None:
        expected = self._expected(item, item.dest_backend, item.dest_key)
        if expected is None:
            self._finish(item, ItemState.failed, error=(
                f"{item.dest_backend}:{item.dest_key} is not in the catalog: nothing to verify it against"))
            return
        started = time.monotonic()
        try:
            ok, nbytes = transfer.check(self._backend(item.dest_backend), item.dest_key,
                                        expected.sha256, expected.size)
        except KeyNotFound as exc:
            self._check(item.dest_backend, item.dest_key, CheckResult.missing, 0, exc.message, started)
            self._finish(item, ItemState.done, digest=expected)
            return
        error = None if ok else f"sha256/size differ from the object's ({expected.sha256}, {expected.size} B)"
        self._check(item.dest_backend, item.dest_key, CheckResult.ok if ok else CheckResult.bad, nbytes, error,
                    started)
        self._finish(item, ItemState.done, digest=expected)

    def _check(self, backend: str, key: str, result: CheckResult, nbytes: int, error: str | None,
               started: float | None = None) -> None:
        seconds = time.monotonic() - started if started is not None else 0.0
        if result != CheckResult.ok:
            log.warning("%s:%s is %s: %s", backend, key, result.value, error)
        with self.lock:
            self.checks.append(Check(backend, key, result, nbytes, seconds, error, self.plan.job_id))

    def _already_there(self, item: Item, src: Backend, dst: Backend) -> Digest | None:
        """The digest if the catalog knows the same verified object at both ends and both
        still have its size; else None (copy it)."""
        source, dest = (item.source_backend, item.source_key), (item.dest_backend, item.dest_key)
        if source not in self.plan.verified or dest not in self.plan.verified:
            return None
        have, there = self.plan.known[source], self.plan.known[dest]
        if have.cid != there.cid:
            return None
        try:
            if dst.stat(item.dest_key).size != there.size:
                return None
            if src.stat(item.source_key).size != have.size:
                return None
        except KeyNotFound:
            return None
        return have

    def _fact(self, backend: str, key: str, digest: Digest, *, verified: bool = False,
              state: ReplicaState = ReplicaState.present) -> ReplicaFact:
        return ReplicaFact(backend, key, state, digest.cid, digest.sha256, digest.size, verified=verified)

    def _finish(self, item: Item, state: ItemState, *, digest: Digest | None = None,
                error: str | None = None) -> None:
        with self.lock:
            self.outcomes.append({"seq": item.seq, "state": state, "error": error, "dest_key": item.dest_key,
                                  "size": digest.size if digest else item.size,
                                  "cid": digest.cid if digest else None})
            if state in (ItemState.done, ItemState.skipped, ItemState.failed, ItemState.stuck):
                self.tally[state.value] += 1

    def flush(self) -> None:
        """Commit buffered facts, checks and outcomes; then delete the sources whose copies
        that commit made durable, and buffer their outcomes for the next flush."""
        with self.lock:
            facts, outcomes, deletes, checks = self.facts, self.outcomes, self.to_delete, self.checks
            self.facts, self.outcomes, self.to_delete, self.checks = [], [], [], []
        with transaction() as session:
            ids = record(session, facts)
            if self.plan.tags and ids:
                label_objects(session, ids.values(), tags=self.plan.tags)
            record_checks(session, checks)
            for o in outcomes:
                o["object_id"] = ids.get(o.pop("cid", None) or "")
            catalog.finish_items(session, self.plan.job_id, outcomes)
            job = session.get(Job, self.plan.job_id)
            self.cancelled = job is None or job.state.terminal
        metrics.items_finished(self.plan, outcomes)
        metrics.checked(checks)
        with self.lock:
            self.open_seqs -= {o["seq"] for o in outcomes}
        for item, digest, state in deletes:
            self._delete_source(item, digest, state)
        self.last_flush = time.monotonic()

    def _delete_source(self, item: Item, digest: Digest, state: ItemState) -> None:
        src_name = item.source_backend
        assert src_name is not None
        try:
            self._backend(src_name).delete(item.source_key)
        except FerryError as exc:
            # The copy is verified and recorded; the source stays, marked so, for a later pass.
            with self.lock:
                self.facts.append(ReplicaFact(src_name, item.source_key, ReplicaState.present, digest.cid,
                                              digest.sha256, digest.size, error=f"delete failed: {exc.message}"))
            self._finish(item, ItemState.failed,
                         error=f"copied and verified, but deleting the source failed: {exc.message}")
            return
        with self.lock:
            self.facts.append(ReplicaFact(src_name, item.source_key, ReplicaState.gone, digest.cid,
                                          digest.sha256, digest.size))
        self._finish(item, state, digest=digest)


class _Heartbeat:
    """While a batch runs: reports how far the current copy has got (every couple of
    seconds, so a large object shows progress) and renews the claim on the batch's open
    items (so the sweeper re-sends them only when this worker is really gone)."""

    PROGRESS_EVERY = 2.0

    def __init__(self, job_id: uuid.UUID, run: _BatchRun, lease_seconds: int):
        self.job_id, self.run, self.lease = job_id, run, timedelta(seconds=lease_seconds)
        self.renew_every = max(1.0, lease_seconds / 3)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="ferry-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _loop(self) -> None:
        last_renew = time.monotonic()
        reported: dict[int, int] = {}
        while not self.stop.wait(min(self.PROGRESS_EVERY, self.renew_every)):
            with self.run.lock:
                progress = {seq: hasher.size for seq, hasher in self.run.in_flight.items()}
                seqs = sorted(self.run.open_seqs)
            changed = {seq: n for seq, n in progress.items() if reported.get(seq) != n}
            renew = time.monotonic() - last_renew >= self.renew_every
            if not changed and not renew:
                continue
            try:
                with transaction() as session:
                    for seq, nbytes in changed.items():
                        catalog.report_progress(session, self.job_id, seq, nbytes)
                    if renew:
                        catalog.renew_lease(session, self.job_id, seqs, lease=self.lease)
                reported = progress
                if renew:
                    last_renew = time.monotonic()
            except Exception:
                log.exception("job %s: heartbeat failed", self.job_id)
