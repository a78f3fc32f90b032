"""The copy verb (`ferry.transfer`): replicate and migrate a batch of job items.

For each claimed item: copy source -> destination while hashing, re-read the
destination and compare, record both replicas as verified; for a migrate, only then
delete the source. Outcomes are written in bulk, one transaction per second of work
at most, so progress shows while a batch runs. Safe to run twice: items already
finished are not claimed again, and a copy already verified is skipped.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ferry.catalog import jobs as catalog
from ferry.catalog.db import transaction
from ferry.catalog.models import ItemState, Job, JobKind, ReplicaState
from ferry.catalog.replicas import ReplicaFact, record, replicas_at
from ferry.errors import BackendUnavailable, FerryError, KeyNotFound, UnknownBackend
from ferry.settings import get_settings
from tasks.app import app, backoff
from workers import registry, transfer
from workers.base import Backend
from workers.cid import ContentHasher, Digest

log = logging.getLogger(__name__)
FLUSH_EVERY = 1.0  # seconds between progress commits within a batch
SMALL_OBJECT = 2**20  # objects up to this size may be copied several at once (FERRY_ITEM_THREADS)


@dataclass(frozen=True, slots=True)
class Item:
    seq: int
    source_key: str
    dest_backend: str
    dest_key: str
    size: int | None
    attempts: int


@dataclass(frozen=True, slots=True)
class Plan:
    job_id: uuid.UUID
    kind: JobKind
    source_backend: str
    keep_source: bool
    items: list[Item]
    known: dict[tuple[str, str], Digest]  # verified replicas the catalog knows, by location


@app.task(name="ferry.transfer", bind=True, max_retries=None)
def transfer_items(self, job_id: str, spans: list[list[int]]) -> dict[str, int]:
    settings = get_settings()
    plan = _claim(uuid.UUID(job_id), [(lo, hi) for lo, hi in spans], settings.lease_seconds)
    if plan is None:
        return {"claimed": 0}
    run = _BatchRun(plan, settings.max_attempts, settings.item_threads)
    with _Heartbeat(plan.job_id, run, settings.lease_seconds):
        run.run()
    if run.retry_seqs:
        countdown = backoff(self.request.retries)
        log.warning("job %s: %d items hit a transient error; retrying in %.0fs",
                    job_id, len(run.retry_seqs), countdown)
        raise self.retry(args=[job_id, [list(s) for s in catalog.spans_of(sorted(run.retry_seqs))]],
                         countdown=countdown)
    return run.tally


def _claim(job_id: uuid.UUID, spans: list[catalog.Span], lease_seconds: int) -> Plan | None:
    with transaction() as session:
        job = session.get(Job, job_id)
        if job is None or job.state.terminal:
            return None
        rows = catalog.claim_items(session, job_id, spans, lease=timedelta(seconds=lease_seconds))
        if not rows:
            return None
        items = [Item(r.seq, r.source_key, r.dest_backend, r.dest_key, r.size, r.attempts) for r in rows]
        locations = [(job.source_backend, i.source_key) for i in items]
        locations += [(i.dest_backend, i.dest_key) for i in items]
        known = {
            loc: Digest(r.size, r.sha256, r.cid)
            for loc, r in replicas_at(session, locations).items()
            if r.state == ReplicaState.present
        }
        return Plan(job.id, job.kind, job.source_backend, bool(job.spec.get("keep_source")), items, known)


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
        self.outcomes: list[dict[str, Any]] = []
        self.to_delete: list[tuple[Item, Digest, ItemState]] = []
        self.retry_seqs: list[int] = []
        self.open_seqs = {i.seq for i in plan.items}
        self.in_flight: dict[int, ContentHasher] = {}  # copies under way, for progress
        self.tally = {"done": 0, "skipped": 0, "failed": 0, "retry": 0}
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
        while self.facts or self.outcomes or self.to_delete:
            self.flush()
        with transaction() as session:
            catalog.finish_if_complete(session, self.plan.job_id)

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
            return backend

    def _process(self, item: Item) -> None:
        plan = self.plan
        try:
            src = self._backend(plan.source_backend)
            dst = self._backend(item.dest_backend)
            digest = self._already_there(item, src, dst)
            state = ItemState.skipped
            facts = []
            if digest is None:
                hasher = ContentHasher()
                with self.lock:
                    self.in_flight[item.seq] = hasher
                try:
                    digest = transfer.copy(src, item.source_key, dst, item.dest_key, size=item.size, hasher=hasher)
                finally:
                    with self.lock:
                        del self.in_flight[item.seq]
                transfer.verify(dst, item.dest_key, digest)
                state = ItemState.done
                facts.append(self._fact(plan.source_backend, item.source_key, digest, verified=True))
            facts.append(self._fact(item.dest_backend, item.dest_key, digest, verified=True))
            with self.lock:
                self.facts += facts
                if self.moves:
                    # The destination is verified; the source goes only after that is committed
                    # (the deleting fact and the delete travel through the same flush).
                    self.facts.append(self._fact(plan.source_backend, item.source_key, digest,
                                                 state=ReplicaState.deleting))
                    self.to_delete.append((item, digest, state))
                else:
                    self._finish(item, state, digest=digest)
        except BackendUnavailable as exc:
            if item.attempts < self.max_attempts:
                with self.lock:
                    self.retry_seqs.append(item.seq)
                    self.tally["retry"] += 1
                self._finish(item, ItemState.queued, error=f"attempt {item.attempts}: {exc.message}")
            else:
                self._finish(item, ItemState.failed, error=f"gave up after {item.attempts} attempts: {exc.message}")
        except FerryError as exc:  # KeyNotFound, ChecksumMismatch, ...: the message names backend and key
            self._finish(item, ItemState.failed, error=exc.message)
        except Exception as exc:  # a bug or an unmapped driver error: fail the item, keep the batch going
            log.exception("job %s item %d failed unexpectedly", plan.job_id, item.seq)
            self._finish(item, ItemState.failed, error=f"internal error: {type(exc).__name__}: {exc}")

    def _already_there(self, item: Item, src: Backend, dst: Backend) -> Digest | None:
        """The digest if the catalog knows the same verified object at both ends and both
        still have its size; else None (copy it)."""
        have = self.plan.known.get((self.plan.source_backend, item.source_key))
        there = self.plan.known.get((item.dest_backend, item.dest_key))
        if have is None or there is None or have.cid != there.cid:
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
            self.outcomes.append({"seq": item.seq, "state": state, "error": error,
                                  "size": digest.size if digest else item.size,
                                  "cid": digest.cid if digest else None})
            if state in (ItemState.done, ItemState.skipped, ItemState.failed):
                self.tally[state.value] += 1

    def flush(self) -> None:
        """Commit buffered facts and outcomes; then delete the sources whose copies that
        commit made durable, and buffer their outcomes for the next flush."""
        with self.lock:
            facts, outcomes, deletes = self.facts, self.outcomes, self.to_delete
            self.facts, self.outcomes, self.to_delete = [], [], []
        with transaction() as session:
            ids = record(session, facts)
            for o in outcomes:
                o["object_id"] = ids.get(o.pop("cid", None) or "")
            catalog.finish_items(session, self.plan.job_id, outcomes)
            job = session.get(Job, self.plan.job_id)
            self.cancelled = job is None or job.state.terminal
        with self.lock:
            self.open_seqs -= {o["seq"] for o in outcomes}
        for item, digest, state in deletes:
            self._delete_source(item, digest, state)
        self.last_flush = time.monotonic()

    def _delete_source(self, item: Item, digest: Digest, state: ItemState) -> None:
        src_name = self.plan.source_backend
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
