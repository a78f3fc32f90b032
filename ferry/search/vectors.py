"""The vector index: FAISS over the chunks' embeddings, shared through snapshots.

The embeddings live in the catalog (`search_chunks.embedding`), so any process can build
the index from there. The index is an ID-mapped exhaustive inner-product index (float16
codes) whose ids are chunk ids: a delete removes ids and never renumbers the rest, and
exhaustive search needs no training. At 100 000 chunks of 384 dimensions it holds 77 MB.

- The index worker `publish`es: brings its copy up to date with the catalog (adds the
  chunks it lacks, removes the ones gone), writes a snapshot file and records its
  generation in `search_index_state`, all under that row's lock.
- Every API process holds a `SharedIndex`: at most every FERRY_SEARCH_RELOAD_SECONDS it
  reads the generation; when it is newer, the process loads that snapshot (or, when it
  cannot read the file, catches up from the catalog) and swaps it in whole, so searches
  running meanwhile finish on the old one.

Each index carries its chunks' owners (chunk id -> object id; a chunk never changes hands
and its id is never reused, so the map is written once with the snapshot, beside it), so
a search finds the objects of its nearest chunks without asking the catalog. The objects
found are checked against the catalog before they are shown, so an object deleted after
the snapshot was written is never returned.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from ferry.catalog.models import SearchChunk, SearchDocument, SearchIndexState, utcnow
from ferry.errors import SearchUnavailable
from ferry.settings import get_settings

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
PAGE = 5000
KEEP_SNAPSHOTS = 2


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchUnavailable("vector search needs faiss-cpu: pip install 'ferry[search]'") from None
    return faiss


@dataclass
class VectorIndex:
    """A FAISS index of chunk embeddings (ids = chunk ids), the chunks' owners (`chunk_ids`
    sorted, `owners[i]` the object of `chunk_ids[i]`) and the generation it is at."""

    index: object
    dim: int
    generation: int = 0
    chunk_ids: np.ndarray | None = None
    owners: np.ndarray | None = None

    def __post_init__(self) -> None:
        import numpy as np

        if self.chunk_ids is None or self.owners is None:
            self.chunk_ids, self.owners = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)

    @classmethod
    def empty(cls, dim: int) -> VectorIndex:
        faiss = _faiss()
        # Exhaustive inner product over float16 codes: half the memory of float32 and, with
        # FAISS' SIMD scan, several times faster per query (bench/search.py); scores agree
        # with float32 to ~1e-3, so rankings are the same but for near-ties. Needs no training.
        codes = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        return cls(faiss.IndexIDMap2(codes), dim)

    @classmethod
    def load(cls, path: Path, generation: int) -> VectorIndex:
        """The snapshot at `path` and its owners file (OSError when either is missing or
        they disagree)."""
        import numpy as np

        index = _faiss().read_index(str(path))
        pairs = np.load(_owners_path(path), allow_pickle=False)
        if pairs.ndim != 2 or pairs.shape[0] != 2 or pairs.shape[1] != index.ntotal:
            raise OSError(f"{_owners_path(path).name} does not match {path.name}")
        return cls(index, index.d, generation, np.ascontiguousarray(pairs[0]), np.ascontiguousarray(pairs[1]))

    @property
    def size(self) -> int:
        return int(self.index.ntotal)  # type: ignore[attr-defined]

    def ids(self) -> np.ndarray:
        """The chunk ids in the index, sorted."""
        assert self.chunk_ids is not None
        return self.chunk_ids

    def owners_of(self, chunk_ids: np.ndarray) -> np.ndarray:
        """The object of each chunk id (-1 for an id not in the index)."""
        import numpy as np

        assert self.chunk_ids is not None and self.owners is not None
        if len(self.chunk_ids) == 0:
            return np.full(len(chunk_ids), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.chunk_ids, chunk_ids), len(self.chunk_ids) - 1)
        return np.where(self.chunk_ids[at] == chunk_ids, self.owners[at], -1)

    def chunks_of(self, object_ids: np.ndarray) -> np.ndarray:
        """The chunk ids of these objects."""
        import numpy as np

        assert self.chunk_ids is not None and self.owners is not None
        return self.chunk_ids[np.isin(self.owners, object_ids)]

    def copy(self) -> VectorIndex:
        return VectorIndex(_faiss().clone_index(self.index), self.dim, self.generation, self.chunk_ids, self.owners)

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The k chunks nearest the (normalised) query vector, best first; with `allowed`,
        only among those chunk ids."""
        import numpy as np

        if self.size == 0 or k <= 0 or (allowed is not None and len(allowed) == 0):
            return []
        faiss = _faiss()
        params = None
        if allowed is not None:
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)))
        scores, ids = self.index.search(query.reshape(1, -1).astype(np.float32), min(k, self.size),  # type: ignore[attr-defined]
                                        params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def sync(self, session: Session, model: str) -> tuple[int, int]:
        """Add the catalog's embedded chunks (of `model`) the index lacks and remove the ids
        the catalog no longer has; returns (added, removed)."""
        import numpy as np

        c, d = SearchChunk.__table__.c, SearchDocument.__table__.c
        rows = session.execute(
            select(c.id, c.object_id).join(SearchDocument.__table__, d.object_id == c.object_id)
            .where(c.embedding.is_not(None), d.model == model).order_by(c.id)).all()
        pairs = np.array(rows, dtype=np.int64).reshape(-1, 2)
        wanted, owners = np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
        have = self.ids()
        missing = np.setdiff1d(wanted, have, assume_unique=True)
        extra = np.setdiff1d(have, wanted, assume_unique=True)
        if len(extra):
            self.index.remove_ids(extra)  # type: ignore[attr-defined]
        added: list[int] = []
        for lo in range(0, len(missing), PAGE):
            page = [int(i) for i in missing[lo:lo + PAGE]]
            got = session.execute(select(c.id, c.embedding).where(c.id.in_(page))).all()
            if not got:
                continue
            vectors = np.frombuffer(b"".join(r.embedding for r in got), dtype=np.float32).reshape(len(got), -1)
            if vectors.shape[1] != self.dim:
                raise SearchUnavailable(f"chunk embeddings have {vectors.shape[1]} dimensions, the index {self.dim}")
            ids = np.array([r.id for r in got], dtype=np.int64)
            self.index.add_with_ids(vectors, ids)  # type: ignore[attr-defined]
            added.extend(int(i) for i in ids)
        if len(missing) or len(extra):
            # Held now: what was wanted, less the missing chunks that vanished between the
            # two reads (the next sync settles those).
            held = np.isin(wanted, missing, assume_unique=True, invert=True)
            if added:
                held |= np.isin(wanted, np.array(added, dtype=np.int64), assume_unique=True)
            self.chunk_ids, self.owners = wanted[held], owners[held]
        return len(added), len(extra)

    def save(self, folder: Path, generation: int) -> str:
        """Write the snapshot of `generation` atomically; returns its file name."""
        folder.mkdir(parents=True, exist_ok=True)
        import numpy as np

        name = f"vectors-{generation:012d}.faiss"
        # The owners first: a reader that finds the snapshot finds its owners beside it.
        owners = _owners_path(folder / name)
        tmp = folder / f".{owners.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.stack([self.ids(), self.owners]), allow_pickle=False)
        os.replace(tmp, owners)
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        _faiss().write_index(self.index, str(tmp))
        os.replace(tmp, folder / name)
        return name


def _owners_path(snapshot: Path) -> Path:
    return snapshot.with_suffix(".owners.npy")


def state(session: Session, *, lock: bool = False) -> SearchIndexState:
    """The one state row, created on first use."""
    row = session.get(SearchIndexState, 1, with_for_update=lock)
    if row is None:
        row = SearchIndexState(id=1, generation=0, vectors=0, updated_at=utcnow())
        session.add(row)
        session.flush()
        if lock:
            row = session.get(SearchIndexState, 1, with_for_update=True)
    return row


_worker_index: VectorIndex | None = None


def publish(session: Session, *, dim: int, model: str) -> SearchIndexState:
    """Bring this process's index up to date with the catalog and, when that changed
    anything, write a new snapshot and make it the current generation. Call it inside a
    transaction: the state row's lock keeps two workers from publishing at once."""
    global _worker_index
    settings = get_settings()
    st = state(session, lock=True)
    folder = settings.search_path
    index = _worker_index
    if index is None or index.generation != st.generation or index.dim != dim:
        index = _load_current(st, folder, dim)
    added, removed = index.sync(session, model)
    if added or removed or st.snapshot is None or st.dim != dim or st.model != model:
        generation = st.generation + 1
        st.snapshot = index.save(folder, generation)
        st.generation, st.vectors, st.dim, st.model, st.updated_at = generation, index.size, dim, model, utcnow()
        index.generation = generation
        _prune(folder, keep=st.snapshot)
        log.info("vector index generation %d: %d vectors (+%d, -%d)", generation, index.size, added, removed)
    _worker_index = index
    return st


def _load_current(st: SearchIndexState, folder: Path, dim: int) -> VectorIndex:
    """The state's snapshot if it can be read and fits, else an empty index (synced after)."""
    if st.snapshot and st.dim == dim:
        try:
            index = VectorIndex.load(folder / st.snapshot, st.generation)
            if index.dim == dim:
                return index
        except (OSError, RuntimeError, ValueError) as exc:  # FAISS: RuntimeError; numpy: ValueError
            log.warning("vector snapshot %s unreadable (%s): rebuilding from the catalog", st.snapshot, exc)
    fresh = VectorIndex.empty(dim)
    fresh.generation = st.generation
    return fresh


def _prune(folder: Path, *, keep: str) -> None:
    """Remove all but the newest snapshots (a process may still be loading the one before)."""
    snaps = sorted(p for p in folder.glob("vectors-*.faiss"))
    for old in snaps[:-KEEP_SNAPSHOTS]:
        if old.name != keep:
            old.unlink(missing_ok=True)
            _owners_path(old).unlink(missing_ok=True)


class SharedIndex:
    """An API process's view of the vector index, reloaded when a newer snapshot exists."""

    def __init__(self) -> None:
        self.current: VectorIndex | None = None
        self.checked = 0.0
        self.lock = threading.Lock()

    def get(self, session: Session, *, dim: int, model: str) -> VectorIndex:
        settings = get_settings()
        now = time.monotonic()
        index = self.current
        if index is not None and index.dim == dim and now - self.checked < settings.search_reload_seconds:
            return index
        with self.lock:  # one thread reloads; the others keep searching the old index
            index = self.current
            st = session.get(SearchIndexState, 1)
            generation = st.generation if st is not None else 0
            if index is None or index.dim != dim or index.generation < generation:
                index = self._reload(session, st, dim, model)
                self.current = index
            self.checked = time.monotonic()
            return index

    def _reload(self, session: Session, st: SearchIndexState | None, dim: int, model: str) -> VectorIndex:
        started = time.monotonic()
        if st is not None and st.snapshot and st.dim == dim:
            try:
                index = VectorIndex.load(get_settings().search_path / st.snapshot, st.generation)
                log.info("loaded vector snapshot %s (%d vectors) in %.2fs", st.snapshot, index.size,
                         time.monotonic() - started)
                return index
            except (OSError, RuntimeError, ValueError) as exc:
                log.warning("vector snapshot %s unreadable here (%s): catching up from the catalog", st.snapshot, exc)
        # No snapshot to read: bring a copy of what we have up to date from the catalog.
        index = self.current.copy() if self.current is not None and self.current.dim == dim else VectorIndex.empty(dim)
        added, removed = index.sync(session, model)
        index.generation = st.generation if st is not None else 0
        log.info("vector index caught up from the catalog (+%d, -%d) in %.2fs", added, removed,
                 time.monotonic() - started)
        return index


shared = SharedIndex()
