"""Submitting jobs, and listing a source prefix into job items (`ferry.expand`).

A job names its source as a list of keys or a prefix of a backend. Keys become items
at once, in bulk, in the request's transaction; a prefix is listed by a task on the
source backend's queue, a page at a time, so a request never waits on a listing.
Messages are sent only after the transaction that created their items commits.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import select

from ferry.catalog import jobs as catalog
from ferry.catalog.db import after_commit, transaction
from ferry.catalog.models import (
    SEARCH_INDEX,
    ItemAction,
    Job,
    JobKind,
    JobState,
    Replica,
    ReplicaState,
    StoredObject,
    utcnow,
)
from ferry.catalog.replicas import get_object, under_prefix
from ferry.errors import (
    BackendUnavailable,
    Conflict,
    FerryError,
    InvalidRequest,
    ReadOnlyBackend,
    UnknownBackend,
)
from ferry.search import store as search_store
from ferry.settings import get_settings
from tasks.app import app, backoff, send_batches, send_expand, send_publish
from workers import registry
from workers.base import ObjectStat, check_key, check_prefix

log = logging.getLogger(__name__)
PAGE = 1000


@dataclass(frozen=True)
class Target:
    backend: str
    prefix: str = ""


@dataclass(frozen=True)
class JobRequest:
    """A validated bulk request; dest key = target prefix + source key less source prefix."""

    kind: JobKind
    source_backend: str
    targets: list[Target]
    keys: list[str] | None = None
    prefix: str | None = None
    keep_source: bool = False
    spec: dict = field(default_factory=dict)
    sample: float | None = None  # verify: percent of keys checked, chosen by a hash of the key

    def dest_key(self, target: Target, key: str) -> str:
        """On a content-addressed target the key is the object's CID: the source's key when
        that is a CID too, else '' until the copy computes it."""
        if _content_addressed(target.backend):
            return key if _content_addressed(self.source_backend) else ""
        rel = key[len(self.prefix):] if self.prefix else key
        return target.prefix + rel

    def items(self, keys: list[tuple[str, int | None]]) -> list[catalog.NewItem]:
        """The items of some source keys (with sizes when known)."""
        if self.kind == JobKind.verify:
            return [catalog.NewItem(key, self.source_backend, key, size, action=ItemAction.verify)
                    for key, size in keys if self.sampled(key)]
        if self.kind == JobKind.index:  # into the search indexes, on the index queue
            return [catalog.NewItem(key, SEARCH_INDEX, key, size, action=ItemAction.index) for key, size in keys]
        if self.kind == JobKind.deal:  # the CID is filled in from the catalog when packed
            return [catalog.NewItem(key, t.backend, "", size, action=ItemAction.deal)
                    for t in self.targets for key, size in keys]
        return [catalog.NewItem(key, t.backend, self.dest_key(t, key), size)
                for t in self.targets for key, size in keys]

    def sampled(self, key: str) -> bool:
        if self.sample is None:
            return True
        # Deterministic: the same keys are in a 10% sample every time, and in every larger one.
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4]) % 10_000 < self.sample * 100


def _content_addressed(backend: str) -> bool:
    spec = get_settings().backends().get(backend)
    return spec is not None and registry.traits(spec.driver)[0]


def validate(request: JobRequest) -> None:
    """Refuse what can be known wrong before anything is stored (InvalidRequest family)."""
    backends = get_settings().backends()
    if request.source_backend not in backends:
        raise UnknownBackend(f"unknown backend {request.source_backend!r}", field="source.backend")
    if request.kind in (JobKind.verify, JobKind.index):
        if request.targets:
            what = "checks replicas where they are" if request.kind == JobKind.verify else \
                "reads objects from their verified replicas into the search indexes"
            raise InvalidRequest(f"a {request.kind.value} job {what}: it has no targets", field="targets")
        if request.kind == JobKind.index and request.sample is not None:
            raise InvalidRequest("sample applies to verify jobs only", field="sample")
        if request.keep_source:
            raise InvalidRequest("keep_source applies to migrate jobs only", field="keep_source")
    elif request.sample is not None:
        raise InvalidRequest("sample applies to verify jobs only", field="sample")
    elif request.kind == JobKind.deal:
        _validate_deal(request, backends)
        return
    elif not request.targets:
        raise InvalidRequest("at least one target is required", field="targets")
    if request.kind == JobKind.migrate and len(request.targets) != 1:
        raise InvalidRequest("a migrate job has exactly one target", field="targets")
    seen = set()
    for i, t in enumerate(request.targets):
        if t.backend not in backends:
            raise UnknownBackend(f"unknown backend {t.backend!r}", field=f"targets[{i}].backend")
        check_prefix(t.prefix)
        content_addressed, read_only = registry.traits(backends[t.backend].driver)
        if read_only:
            raise ReadOnlyBackend(f"backend {t.backend!r} is read-only: it can be a source, never a target",
                                  field=f"targets[{i}].backend")
        if content_addressed and t.prefix:
            raise InvalidRequest(f"backend {t.backend!r} keys objects by CID: a target prefix means nothing there",
                                 field=f"targets[{i}].prefix")
        if t.backend in seen:
            raise InvalidRequest(f"backend {t.backend!r} is named twice", field=f"targets[{i}].backend")
        seen.add(t.backend)
    if (request.keys is None) == (request.prefix is None):
        raise InvalidRequest("give the source as either keys or a prefix", field="source")
    if request.keys is not None:
        if not request.keys:
            raise InvalidRequest("the source key list is empty", field="source.keys")
        for i, key in enumerate(request.keys):
            try:
                check_key(key)
            except FerryError as exc:
                exc.field = f"source.keys[{i}]"
                raise
        if len(set(request.keys)) != len(request.keys):
            raise InvalidRequest("the source key list repeats keys", field="source.keys")
    else:
        check_prefix(request.prefix or "")
    for i, t in enumerate(request.targets):
        if t.backend == request.source_backend and t.prefix == (request.prefix or ""):
            raise InvalidRequest("a target is the source itself: every object would be copied onto itself",
                                 field=f"targets[{i}]")


def _validate_deal(request: JobRequest, backends: dict) -> None:
    if len(request.targets) != 1:
        raise InvalidRequest("a deal job has exactly one target: the filecoin backend", field="targets")
    target = request.targets[0]
    spec = backends.get(target.backend)
    if spec is None:
        raise UnknownBackend(f"unknown backend {target.backend!r}", field="targets[0].backend")
    if spec.driver != "filecoin":
        raise InvalidRequest(f"backend {target.backend!r} is a {spec.driver} backend: deals are made by a "
                             "filecoin backend", field="targets[0].backend")
    if target.prefix:
        raise InvalidRequest("a deal job keys objects by CID: a target prefix means nothing there",
                             field="targets[0].prefix")
    if request.keep_source:
        raise InvalidRequest("keep_source applies to migrate jobs only", field="keep_source")
    if (request.keys is None) == (request.prefix is None):
        raise InvalidRequest("give the source as either keys or a prefix", field="source")
    for i, key in enumerate(request.keys or []):
        try:
            check_key(key)
        except FerryError as exc:
            exc.field = f"source.keys[{i}]"
            raise
    if request.prefix is not None:
        check_prefix(request.prefix)


def submit(request: JobRequest) -> Job:
    """Validate, store the job (and its items when keys are given) and enqueue its work."""
    validate(request)
    settings = get_settings()
    with transaction() as session:
        job = catalog.create_job(session, kind=request.kind, source_backend=request.source_backend,
                                 spec=request.spec, expand=request.prefix is not None)
        if request.keys is not None:
            items = request.items([(key, None) for key in request.keys])
            batches = catalog.add_items(session, job.id, 0, items, batch_items=settings.batch_items,
                                        batch_bytes=settings.batch_bytes, fresh=True)
            catalog.mark_expanded(session, job, len(items))
            after_commit(session, lambda: send_batches(batches))
        else:
            job_id = str(job.id)
            after_commit(session, lambda: send_expand(job_id, request.source_backend))
    return job


def delete_object(cid: str, authorize: Callable[[list[str]], None]) -> Job:
    """Remove an object from every backend (a `delete` job: one item per replica, each
    deleted by its backend's worker) and from the search indexes at once. `authorize` is
    given the backends holding it before anything changes. Refused under legal hold, and
    while a replica lies where Ferry cannot delete it (a read-only backend such as Filecoin
    deals, or one no longer configured): nothing is deleted then."""
    settings = get_settings()
    backends = settings.backends()
    with transaction() as session:
        obj = get_object(session, cid)
        if obj.legal_hold:
            raise Conflict(f"object {cid} is under legal hold: release it first (PUT /v1/objects/{cid}/hold)")
        held = [r for r in obj.replicas if r.state != ReplicaState.gone]
        authorize(sorted({r.backend for r in held}))
        stuck = sorted({r.backend for r in held if r.backend not in backends
                        or registry.traits(backends[r.backend].driver)[1]})
        if stuck:
            raise Conflict(f"object {cid} has replicas where Ferry cannot delete them: {', '.join(stuck)} "
                           "(read-only or not configured); nothing was deleted", details={"backends": stuck})
        spec = {"cid": cid, "source": {}, "targets": [{"backend": b, "prefix": ""} for b in
                                                       sorted({r.backend for r in held})]}
        job = catalog.create_job(session, kind=JobKind.delete, source_backend=None, spec=spec, expand=False)
        items = [catalog.NewItem(r.key, r.backend, r.key, obj.size, action=ItemAction.delete, object_id=obj.id)
                 for r in sorted(held, key=lambda r: (r.backend, r.key))]
        for r in held:  # no pass copies from, or counts, a replica on its way out
            r.state, r.updated_at = ReplicaState.deleting, utcnow()
        search_store.remove(session, [obj.id])
        batches = catalog.add_items(session, job.id, 0, items, batch_items=settings.batch_items,
                                    batch_bytes=settings.batch_bytes, fresh=True)
        catalog.mark_expanded(session, job, len(items))
        if not items:
            catalog.finish_if_complete(session, job.id)
        after_commit(session, lambda: send_batches(batches))
        after_commit(session, send_publish)
    return job


def request_from_spec(kind: JobKind, spec: dict) -> JobRequest:
    """The request of a stored prefix job (a key-list job's spec keeps only a key count)."""
    src = spec["source"]
    return JobRequest(kind=kind, source_backend=src["backend"], keys=None, sample=spec.get("sample"),
                      prefix=src.get("prefix"), keep_source=spec.get("keep_source", False),
                      targets=[Target(t["backend"], t.get("prefix", "")) for t in spec["targets"]],
                      spec=spec)


@app.task(name="ferry.expand", bind=True, max_retries=None)
def expand(self, job_id: str) -> dict:
    """List the job's source prefix into items, a page at a time; idempotent."""
    settings = get_settings()
    jid = uuid.UUID(job_id)
    with transaction() as session:
        job = session.get(Job, jid)
        if job is None or job.state != JobState.pending:
            return {"items": 0}
        request = request_from_spec(job.kind, job.spec)
    try:
        spec = settings.backends().get(request.source_backend)
        if spec is None:
            raise UnknownBackend(f"backend {request.source_backend!r} is no longer configured")
        # A verify job checks what the catalog says is there (so a vanished object is found
        # missing), deal and index jobs take what the catalog knows; others take what the
        # source lists.
        listing = (_catalogued(request.source_backend, request.prefix or "")
                   if request.kind in (JobKind.verify, JobKind.deal, JobKind.index)
                   else registry.get(spec).list(request.prefix or ""))
        seq = 0
        page = []
        for stat in listing:
            page.append(stat)
            if len(page) == PAGE:
                seq = _add_page(jid, request, seq, page)
                page = []
        seq = _add_page(jid, request, seq, page)
    except BackendUnavailable as exc:
        if self.request.retries < settings.max_attempts:
            log.warning("listing %s for job %s: %s; retrying", request.source_backend, job_id, exc)
            raise self.retry(countdown=backoff(self.request.retries)) from exc
        _fail(jid, f"listing the source failed after {settings.max_attempts + 1} attempts: {exc.message}")
        return {"items": 0}
    except FerryError as exc:
        _fail(jid, f"listing the source failed: {exc.message}")
        return {"items": 0}
    with transaction() as session:
        job = catalog.get_job(session, jid, lock=True)
        if job.state == JobState.pending:
            if seq == 0:
                where = f"{request.source_backend}:{request.prefix}"
                catalog.fail_job(session, job, f"the source prefix {where!r} matched no objects")
            else:
                catalog.mark_expanded(session, job, seq)
                session.flush()
                catalog.finish_if_complete(session, jid)
    return {"items": seq}


def _catalogued(backend: str, prefix: str) -> Iterator[ObjectStat]:
    """The catalogued replicas on `backend` under `prefix` (not deleted), in key order,
    read a page per transaction."""
    after = None
    while True:
        with transaction() as session:
            q = (select(Replica.key, StoredObject.size).join(StoredObject, StoredObject.id == Replica.object_id)
                 .where(Replica.backend == backend, under_prefix(Replica.key, prefix),
                        Replica.state.not_in([ReplicaState.gone, ReplicaState.deleting]))
                 .order_by(Replica.key).limit(PAGE))
            if after is not None:
                q = q.where(Replica.key > after)
            rows = session.execute(q).all()
        yield from (ObjectStat(key, size) for key, size in rows)
        if len(rows) < PAGE:
            return
        after = rows[-1][0]


def _fail(jid: uuid.UUID, reason: str) -> None:
    with transaction() as session:
        job = catalog.get_job(session, jid, lock=True)
        if job.state == JobState.pending:
            catalog.fail_job(session, job, reason)


def _add_page(jid: uuid.UUID, request: JobRequest, seq: int, page: list) -> int:
    if not page:
        return seq
    settings = get_settings()
    items = request.items([(stat.key, stat.size) for stat in page])
    if not items:
        return seq
    with transaction() as session:
        job = catalog.get_job(session, jid, lock=True)
        if job.state != JobState.pending:  # cancelled while listing
            return seq + len(items)
        batches = catalog.add_items(session, jid, seq, items, batch_items=settings.batch_items,
                                    batch_bytes=settings.batch_bytes)
        after_commit(session, lambda: send_batches(batches))
    return seq + len(items)
