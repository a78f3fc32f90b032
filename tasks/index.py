"""The index verb: extract objects' text, chunk it, embed it, store it for search.

Index items (action `index`, destination the search indexes) travel on the `index` queue,
so indexing scales on its own workers (the ones holding the model). A batch is worked in
groups of objects: each object whose entry would come out the same as it is (same
fingerprint: content, name, labels, extractor, model, chunking) is skipped without a
read; the others are read from a verified replica (the item's source first, then the most
recently verified; a replica found corrupt or missing is recorded so and the next one is
tried), extracted by media type (ferry.search.extract) and chunked with overlap; every
ENCODE_CHUNKS chunks are encoded in one call and stored with their items' outcomes in one
transaction (full-text search has them from then on). After the batch an index worker
publishes the vector index (`ferry.index.publish`, ferry.search.vectors): a new snapshot
generation that every API process picks up.

Objects larger than FERRY_INDEX_MAX_BYTES are indexed from their first that many bytes;
such a head cannot be checked against the object's sha256, and the entry says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from ferry.catalog import jobs as job_catalog
from ferry.catalog.db import transaction
from ferry.catalog.models import (
    CheckResult,
    ItemState,
    JobKind,
    Replica,
    ReplicaState,
    SearchChunk,
    StoredObject,
)
from ferry.catalog.replicas import Check, record_checks, replicas_at
from ferry.errors import BackendError, BackendUnavailable, FerryError, KeyNotFound
from ferry.search import embed, extract, store, vectors
from ferry.settings import Settings
from tasks import metrics
from tasks.app import app, send_publish
from workers import registry, transfer

if TYPE_CHECKING:
    from tasks.transfer import Item, Plan

log = logging.getLogger(__name__)
GROUP = 128  # items whose objects are looked up together
ENCODE_CHUNKS = 512  # chunks encoded in one call (and stored, with their items, in one transaction)
GONE = (ReplicaState.gone, ReplicaState.deleting)


@dataclass
class Source:
    """What indexing needs of one object, read from the catalog."""

    object_id: int
    cid: str
    sha256: str
    size: int
    media_type: str | None
    tags: list[str]
    meta: dict[str, Any]
    replicas: list[tuple[str, str]]   # verified, in the order to try
    name: str | None


def fingerprint(src: Source, model: str, settings: Settings) -> str:
    """Everything an entry is made from: an unchanged fingerprint means nothing to do."""
    basis = [src.sha256, src.name, sorted(src.tags), src.meta, src.media_type, extract.EXTRACTOR_VERSION, model,
             settings.chunk_words, settings.chunk_overlap, settings.index_max_bytes, settings.index_max_chars,
             settings.search_language]
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()


def meta_text(meta: dict[str, Any]) -> str:
    return " ".join(f"{k} {v}" for k, v in sorted(meta.items()) if isinstance(v, (str, int, float)))


class IndexRun:
    """Works through a claimed batch of index items (same shape as transfer's batch run,
    so the heartbeat renews its lease)."""

    def __init__(self, plan: Plan, settings: Settings):
        self.plan = plan
        self.settings = settings
        self.lock = threading.RLock()
        self.in_flight: dict[int, Any] = {}
        self.open_seqs = {i.seq for i in plan.items}
        self.retry_seqs: list[int] = []
        self.requeue_seqs: list[int] = []  # put back unstarted: the worker is stopping
        self.tally = {"done": 0, "skipped": 0, "failed": 0, "stuck": 0, "retry": 0, "chunks": 0}
        self.backends: dict[str, Any] = {}

    def run(self) -> None:
        items = list(self.plan.items)
        try:
            model = embed.embedder()
        except FerryError as exc:  # no model here: say so on every item, index nothing
            self._commit([(i, ItemState.failed, f"cannot index: {exc.message}") for i in items])
            return
        from tasks.transfer import draining

        for lo in range(0, len(items), GROUP):
            if draining.is_set():  # stopping: the groups not started go back to the queue
                rest = items[lo:]
                self.requeue_seqs.extend(i.seq for i in rest)
                self.tally["requeued"] = len(rest)
                self._commit([(i, ItemState.queued, None) for i in rest])
                break
            self._group(items[lo:lo + GROUP], model)
        with transaction() as session:
            job_catalog.finish_if_complete(session, self.plan.job_id)
        if self.tally["done"]:
            # Entries are stored (text search has them); an index worker publishes the vector
            # snapshot next, so a batch never waits on writing it (seconds at 100 000 chunks).
            send_publish()

    def _group(self, items: list[Item], model: embed.Embedder) -> None:
        sources = self._sources(items)
        with transaction() as session:
            known = store.fingerprints(session, [s.object_id for s in sources.values()])
        outcomes: list[tuple[Item, ItemState, str | None]] = []
        pending: list[tuple[Item, Source, str, extract.Extracted, str | None, list[str]]] = []
        fresh: list[int] = []
        for item in items:
            src = sources.get(item.seq)
            if src is None:
                where = (f"{item.source_backend}:{item.source_key}" if item.source_backend
                         else f"object {item.source_key}")
                outcomes.append((item, ItemState.failed, f"{where} is not in the catalog: nothing to index"))
                continue
            fp = fingerprint(src, model.name, self.settings)
            if known.get(src.object_id) == fp:
                outcomes.append((item, ItemState.skipped, None))
                fresh.append(src.object_id)
                continue
            try:
                data, complete, backend = self._read(src, item)
            except BackendUnavailable as exc:
                if item.attempts < self.settings.max_attempts:
                    self.retry_seqs.append(item.seq)
                    self.tally["retry"] += 1
                    outcomes.append((item, ItemState.queued, f"attempt {item.attempts}: {exc.message}"))
                else:
                    outcomes.append((item, self._failed, f"gave up after {item.attempts} attempts: {exc.message}"))
                continue
            except FerryError as exc:
                outcomes.append((item, self._failed, exc.message))
                continue
            got = extract.extract(data, media_type=src.media_type, name=src.name,
                                  max_chars=self.settings.index_max_chars, complete=complete)
            del data
            if not complete:  # the extractor said "only the first N bytes were read": say why, and what it means
                note = (f"only the first {self.settings.index_max_bytes} of {src.size} bytes were read "
                        "(FERRY_INDEX_MAX_BYTES); that head could not be checked against the object's sha256")
                own = got.reason if got.reason and not got.reason.startswith("only the first") else None
                got = extract.Extracted(got.media_type, got.title, got.text, got.metadata_only, True,
                                        note if own is None else f"{own}; {note}")
            pending.append((item, src, fp, got, backend, self._chunks(src, got)))
            if sum(len(p[-1]) for p in pending) >= ENCODE_CHUNKS:
                self._store(pending, model, outcomes, fresh)
                outcomes, pending, fresh = [], [], []
        self._store(pending, model, outcomes, fresh)

    def _chunks(self, src: Source, got: extract.Extracted) -> list[str]:
        """The texts embedded and matched: the body in overlapping chunks (title first), or
        for a metadata-only entry one chunk of name, title, tags and metadata."""
        if got.metadata_only or not got.text.strip():
            return [" ".join(filter(None, [src.name, got.title, " ".join(src.tags), meta_text(src.meta)])) or src.cid]
        body = got.text if not got.title or got.text.lstrip().startswith(got.title) else f"{got.title}\n\n{got.text}"
        return embed.chunk(body, words=self.settings.chunk_words, overlap=self.settings.chunk_overlap)

    def _store(self, pending: list, model: embed.Embedder, outcomes: list, fresh: list[int]) -> None:
        """Encode the pending entries' chunks in one call (sentence-transformers batches and
        sorts them by length) and store them with the items' outcomes in one transaction."""
        texts = [c for *_, chunks in pending for c in chunks]
        matrix = model.encode(texts)
        entries, row = [], 0
        for _item, src, fp, got, backend, chunks in pending:
            vecs = [matrix[row + i].tobytes() for i in range(len(chunks))]
            row += len(chunks)
            entries.append(store.Entry(
                object_id=src.object_id, fingerprint=fp, name=src.name, title=got.title, media_type=got.media_type,
                metadata_only=got.metadata_only, truncated=got.truncated, reason=got.reason,
                body="" if got.metadata_only else got.text, tags=sorted(src.tags), meta_text=meta_text(src.meta),
                chunks=chunks, embeddings=vecs, model=model.name, source_backend=backend))
        self._commit(outcomes + [(item, ItemState.done, None) for item, *_ in pending], entries, fresh)
        self.tally["chunks"] += len(texts)

    @property
    def _failed(self) -> ItemState:
        return ItemState.stuck if self.plan.kind == JobKind.reconcile else ItemState.failed

    def _sources(self, items: list[Item]) -> dict[int, Source]:
        """The objects the items name (by location on the job's source, else by object id)."""
        backends = self.settings.backends()
        o, r = StoredObject.__table__.c, Replica.__table__.c
        out: dict[int, Source] = {}
        with transaction() as session:
            at = replicas_at(session, [(i.source_backend, i.source_key) for i in items
                                       if i.object_id is None and i.source_backend])
            wanted = {}
            for item in items:
                row = at.get((item.source_backend, item.source_key))
                wanted[item.seq] = item.object_id if item.object_id is not None else (
                    row.object_id if row is not None and row.state not in GONE else None)
            ids = {oid for oid in wanted.values() if oid is not None}
            if not ids:
                return out
            objects = {row.id: row for row in session.execute(
                select(o.id, o.cid, o.sha256, o.size, o.media_type, o.tags, o.metadata).where(o.id.in_(ids)))}
            replicas: dict[int, list[Any]] = {}
            for row in session.execute(select(r.object_id, r.backend, r.key, r.state, r.verified_at)
                                       .where(r.object_id.in_(ids))):
                replicas.setdefault(row.object_id, []).append(row)
        for item in items:
            oid = wanted.get(item.seq)
            if oid is None or oid not in objects:
                continue
            obj, reps = objects[oid], replicas.get(oid, [])
            good = sorted((x for x in reps if x.state == ReplicaState.present and x.backend in backends),
                          key=lambda x: ((x.backend, x.key) != (item.source_backend, item.source_key),
                                         -(x.verified_at.timestamp() if x.verified_at else 0)))
            keyed = [x.key for x in reps if x.backend in backends
                     and not registry.traits(backends[x.backend].driver)[0]]
            if item.source_backend in backends and not registry.traits(backends[item.source_backend].driver)[0]:
                keyed.insert(0, item.source_key)
            meta = dict(obj.metadata or {})
            name = keyed[0] if keyed else (str(meta["name"]) if "name" in meta else None)
            out[item.seq] = Source(oid, obj.cid, obj.sha256, obj.size, obj.media_type, list(obj.tags or []), meta,
                                   [(x.backend, x.key) for x in good], name)
        return out

    def _read(self, src: Source, item: Item) -> tuple[bytes, bool, str | None]:
        """The object's bytes (at most FERRY_INDEX_MAX_BYTES), whether that is all of it, and
        the backend read. Whole objects are checked against the sha256 as they are read."""
        if not src.replicas:
            raise FerryError(f"object {src.cid} has no verified replica to read from")
        limit = self.settings.index_max_bytes
        last: BackendError | None = None
        for backend_name, key in src.replicas:
            backend = self._backend(backend_name)
            try:
                if src.size <= limit:
                    def bad(reason: str, b: str = backend_name, k: str = key) -> None:
                        _record_check(Check(b, k, CheckResult.bad, src.size, 0.0, reason))
                    return b"".join(transfer.verified_stream(backend, key, src.sha256, src.size, bad)), True, \
                        backend_name
                head = bytearray()
                reader = backend.read(key)
                try:
                    for chunk in reader:
                        head += chunk
                        if len(head) >= limit:
                            break
                finally:
                    close = getattr(reader, "close", None)
                    if close is not None:
                        close()
                return bytes(head[:limit]), False, backend_name
            except KeyNotFound as exc:
                _record_check(Check(backend_name, key, CheckResult.missing, 0, 0.0, exc.message))
                last = exc
            except BackendError as exc:
                last = exc
        assert last is not None
        if isinstance(last, BackendUnavailable):
            raise last
        raise FerryError(f"no replica of object {src.cid} could be read: {last.message}")

    def _backend(self, name: str):
        backend = self.backends.get(name)
        if backend is None:
            backend = self.backends[name] = registry.get(self.settings.backends()[name])
        return backend

    def _commit(self, outcomes: list[tuple[Item, ItemState, str | None]], entries: list[store.Entry] | None = None,
                fresh: list[int] | None = None) -> None:
        """The items' outcomes (and the entries made for them) in one transaction."""
        rows = [{"seq": item.seq, "state": state, "error": error, "size": item.size, "dest_key": None}
                for item, state, error in outcomes]
        with transaction() as session:
            if entries:
                store.replace(session, entries)
            if fresh:
                store.mark_fresh(session, fresh)
            job_catalog.finish_items(session, self.plan.job_id, rows)
        metrics.items_finished(self.plan, rows)
        with self.lock:
            self.open_seqs -= {item.seq for item, _, _ in outcomes}
        for _, state, _ in outcomes:
            if state in (ItemState.done, ItemState.skipped, ItemState.failed, ItemState.stuck):
                self.tally[state.value] += 1


def _record_check(check: Check) -> None:
    with transaction() as session:
        record_checks(session, [check])
    metrics.checked([check])


@app.task(name="ferry.index.publish")
def publish() -> dict[str, int]:
    """Bring the vector index snapshot up to date with the catalog (beat, and after entries
    are removed; also covers a worker that died between storing entries and publishing).
    Where nothing was ever indexed it returns at once, without loading the model."""
    with transaction() as session:
        st = vectors.state(session)
        if st.dim is None and session.scalar(select(SearchChunk.id).limit(1)) is None:
            return {"generation": st.generation, "vectors": 0}
    model = embed.embedder()
    with transaction() as session:
        st = vectors.publish(session, dim=model.dim, model=model.name)
        return {"generation": st.generation, "vectors": st.vectors}
