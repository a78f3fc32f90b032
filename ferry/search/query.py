"""Searching the indexes: full-text, vector and hybrid, with filters and pages.

Results are objects, each shown by its best-matching chunk:
- text: Postgres `websearch_to_tsquery` over the chunks' weighted tsvectors, ranked by
  `ts_rank` (weights A name/title 1.0, B tags 0.4, C metadata and body 0.1 and 0.2: the
  defaults); SQLite: the same query syntax turned into an FTS5 query, ranked by BM25 with
  column weights 10/4/1/1 (name/title, tags, metadata, body).
- vector: the query's embedding against the FAISS index (cosine); the index maps chunks to
  their objects itself. A filter that leaves few objects (SELECTIVE_OBJECTS) is searched
  exactly over only their chunks (a FAISS ID selector), so it never empties a page; a
  looser one keeps the nearest chunks whose objects pass it. The query is embedded while
  the text ranking's SQL runs.
- hybrid: reciprocal rank fusion, score = w / (k + rank_vector) + (1 - w) / (k + rank_text)
  with k = 60 (Cormack et al. 2009) over the top 30 of each (more for deeper pages); a
  ranking that misses an object adds nothing. Ranks
  rather than scores, because BM25/ts_rank and cosine are on unrelated scales.

Snippets are HTML-safe: the chunk's text is escaped and matches are wrapped in <mark>.
"""

from __future__ import annotations

import functools
import html
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    and_,
    any_,
    bindparam,
    column,
    func,
    literal,
    literal_column,
    select,
    table,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY, REGCONFIG
from sqlalchemy.orm import Session

from ferry.catalog.filters import has_metadata, has_tags, media_type_in, stored_on
from ferry.catalog.models import SearchChunk, SearchDocument, StoredObject
from ferry.settings import get_settings

OBJ = StoredObject.__table__.c
DOC = SearchDocument.__table__.c
CHUNK = SearchChunk.__table__.c
FTS = table("search_fts", column("rowid"), column("search_fts"))
RRF_K = 60
HYBRID_DEPTH = 30  # each ranking's candidates fused in hybrid mode (more when a page needs them)
MODES = ("text", "vector", "hybrid")
START, STOP = "\x02", "\x03"  # match markers inside snippets, before escaping
SNIPPET_WORDS = 32


@dataclass(frozen=True)
class Filters:
    tags: Sequence[str] = ()             # all of them
    media_types: Sequence[str] = ()      # any of them; "text/*" for a whole type
    metadata: dict[str, Any] = field(default_factory=dict)
    backends: Sequence[str] = ()         # a verified replica on one of them
    readable: Sequence[str] | None = None  # the caller's readable backends (None: all)
    created_after: datetime | None = None
    created_before: datetime | None = None
    indexed_after: datetime | None = None
    indexed_before: datetime | None = None

    def clause(self, dialect: str) -> ColumnElement[bool]:
        # The media type as indexing found it (declared, else detected), not only as declared.
        clauses: list[ColumnElement[bool]] = [has_tags(dialect, self.tags), has_metadata(dialect, self.metadata),
                                              media_type_in(self.media_types, DOC.media_type)]
        if self.backends:
            clauses.append(stored_on(self.backends))
        if self.readable is not None:
            clauses.append(stored_on(self.readable))
        for col, after, before in ((OBJ.created_at, self.created_after, self.created_before),
                                   (DOC.indexed_at, self.indexed_after, self.indexed_before)):
            if after is not None:
                clauses.append(col >= after)
            if before is not None:
                clauses.append(col < before)
        return and_(true(), *clauses)

    @property
    def empty(self) -> bool:
        return not any((self.tags, self.media_types, self.metadata, self.backends)) and self.readable is None \
            and all(d is None for d in (self.created_after, self.created_before, self.indexed_after,
                                        self.indexed_before))


@dataclass
class Hit:
    object_id: int
    score: float = 0.0
    text_rank: int | None = None
    text_score: float | None = None
    text_chunk: int | None = None
    vector_rank: int | None = None
    vector_score: float | None = None
    vector_chunk: int | None = None
    row: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    mode: str
    hits: list[Hit]
    next_offset: int | None
    took_ms: float
    vector_generation: int | None = None


def search(session: Session, q: str, *, mode: str = "hybrid", filters: Filters | None = None, limit: int = 10,
           offset: int = 0, weight: float = 0.5) -> Result:
    """One page of results for `q`; `weight` is the vector ranking's share in hybrid mode."""
    started = time.perf_counter()
    filters = filters or Filters()
    need = offset + limit + 1  # one more tells whether a next page exists
    text_hits: list[Hit] = []
    vector_hits: list[Hit] = []
    generation = None
    depth = max(need, HYBRID_DEPTH) if mode == "hybrid" else need
    # The query's embedding is computed on another thread while the text ranking's SQL runs
    # (torch and the database driver both release the GIL): hybrid costs the longer of the
    # two, not their sum.
    encoding = _encoder().submit(_embed_query, q) if mode in ("vector", "hybrid") else None
    if mode in ("text", "hybrid"):
        text_hits = text_ranking(session, q, filters, depth)
    if encoding is not None:
        vector_hits, generation = vector_ranking(session, q, filters, depth, vec=encoding.result())
    if mode == "text":
        ranked = text_hits
    elif mode == "vector":
        ranked = vector_hits
    else:
        ranked = fuse(text_hits, vector_hits, weight)
    page = ranked[offset:offset + limit]
    _hydrate(session, q, page)
    return Result(mode, page, offset + limit if len(ranked) > offset + limit else None,
                  (time.perf_counter() - started) * 1000, generation)


def fuse(text_hits: list[Hit], vector_hits: list[Hit], weight: float, k: int = RRF_K) -> list[Hit]:
    """Reciprocal rank fusion of the two rankings (ties by object id, for stable pages)."""
    merged: dict[int, Hit] = {}
    for h in text_hits:
        merged[h.object_id] = Hit(h.object_id, text_rank=h.text_rank, text_score=h.text_score,
                                  text_chunk=h.text_chunk)
    for h in vector_hits:
        m = merged.setdefault(h.object_id, Hit(h.object_id))
        m.vector_rank, m.vector_score, m.vector_chunk = h.vector_rank, h.vector_score, h.vector_chunk
    for m in merged.values():
        m.score = ((1 - weight) / (k + m.text_rank) if m.text_rank else 0.0) + \
                  (weight / (k + m.vector_rank) if m.vector_rank else 0.0)
    return sorted(merged.values(), key=lambda m: (-m.score, m.object_id))


def _joined(q: Select) -> Select:
    return (q.join(SearchDocument.__table__, DOC.object_id == CHUNK.object_id)
            .join(StoredObject.__table__, OBJ.id == CHUNK.object_id))


def text_ranking(session: Session, q: str, filters: Filters, k: int) -> list[Hit]:
    """Objects whose chunks match the query, best first (rank 1..), by their best chunk."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        tsq = func.websearch_to_tsquery(literal(get_settings().search_language, REGCONFIG), q)
        score = func.ts_rank(CHUNK.tsv, tsq)
        match = CHUNK.tsv.op("@@")(tsq)
        base = _joined(select(CHUNK.object_id, CHUNK.id.label("chunk"), score.label("score")).select_from(
            SearchChunk.__table__))
    else:
        fts_q = fts5_query(q)
        if fts_q is None:
            return []
        # bm25() only works in the query that does the MATCH: score there, rank outside.
        matched = (select(FTS.c.rowid.label("id"), (-func.bm25(literal_column("search_fts"), 10.0, 4.0, 1.0, 1.0))
                          .label("score"))
                   .where(FTS.c.search_fts.op("MATCH")(fts_q)).cte("fts_hits").prefix_with("MATERIALIZED"))
        score = matched.c.score
        match = true()
        base = _joined(select(CHUNK.object_id, CHUNK.id.label("chunk"), score.label("score")).select_from(matched)
                       .join(SearchChunk.__table__, CHUNK.id == matched.c.id))
    ranked = base.where(match, filters.clause(dialect)).add_columns(
        func.row_number().over(partition_by=CHUNK.object_id, order_by=score.desc()).label("n")).subquery()
    rows = session.execute(select(ranked.c.object_id, ranked.c.chunk, ranked.c.score).where(ranked.c.n == 1)
                           .order_by(ranked.c.score.desc(), ranked.c.object_id).limit(k)).all()
    return [Hit(r.object_id, text_rank=i, text_score=float(r.score), text_chunk=r.chunk)
            for i, r in enumerate(rows, start=1)]


@functools.cache
def _encoder() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="ferry-query-embed")


def _embed_query(q: str) -> Any:
    from ferry.search.embed import embedder

    return embedder(queries=True).encode([q])[0]


def vector_ranking(session: Session, q: str, filters: Filters, k: int, vec: Any = None) -> tuple[list[Hit], int]:
    """Objects whose chunks are nearest the query's embedding, best first, by their best chunk.

    A filter that leaves at most SELECTIVE_OBJECTS objects is searched exactly over only
    their chunks (a FAISS ID selector), so it never empties a page; a looser one keeps the
    nearest chunks whose objects pass it, looking further until k objects are found."""
    import numpy as np

    from ferry.search.embed import embedder
    from ferry.search.vectors import shared

    model = embedder(queries=True)
    index = shared.get(session, dim=model.dim, model=model.name)
    if vec is None:
        vec = model.encode([q])[0]
    if filters.empty:
        return _nearest(index, vec, k, lambda ids: _live(session, ids)), index.generation
    clause = filters.clause(session.get_bind().dialect.name)
    objects = select(DOC.object_id).select_from(SearchDocument.__table__) \
        .join(StoredObject.__table__, OBJ.id == DOC.object_id).where(clause)
    allowed = session.scalars(objects.limit(SELECTIVE_OBJECTS + 1)).all()
    if len(allowed) <= SELECTIVE_OBJECTS:
        chunks = index.chunks_of(np.array(allowed, dtype=np.int64))
        passing = set(allowed)
        return _nearest(index, vec, k, lambda ids: passing.intersection(ids), chunks), index.generation
    return _nearest(index, vec, k, lambda ids: set(session.scalars(
        objects.where(_among(session, DOC.object_id, ids))))), index.generation


# Filters leaving at most this many objects are searched over only their chunks.
SELECTIVE_OBJECTS = 5000


def _live(session: Session, object_ids: list[int]) -> set[int]:
    """Those of the objects that still have an index entry (one deleted since the snapshot
    was written has not)."""
    return set(session.scalars(select(DOC.object_id).where(_among(session, DOC.object_id, object_ids))))


def _nearest(index: Any, vec: Any, k: int, keep: Callable[[list[int]], set[int]], allowed: Any = None) -> list[Hit]:
    """The k objects of the nearest chunks (among `allowed` chunk ids) that `keep` keeps."""
    import numpy as np

    want = k * 4
    while True:
        found = index.search(vec, want, allowed)
        if not found:
            return []
        owners = index.owners_of(np.fromiter((c for c, _ in found), dtype=np.int64, count=len(found)))
        seen = list(dict.fromkeys(int(o) for o in owners if o >= 0))
        kept = keep(seen) if seen else set()
        hits: dict[int, Hit] = {}
        for (chunk_id, score), oid in zip(found, owners, strict=True):
            oid = int(oid)
            if oid in kept and oid not in hits:
                hits[oid] = Hit(oid, vector_rank=len(hits) + 1, vector_score=score, vector_chunk=chunk_id)
        if len(hits) >= k or len(found) < want:
            return list(hits.values())[:k]
        want *= 4


def _among(session: Session, col: Any, ids: list[int]) -> ColumnElement[bool]:
    """`col` is one of `ids`: on Postgres one array parameter (`= ANY(:ids)`), which plans
    and binds in half the time of thousands of separate parameters."""
    if session.get_bind().dialect.name == "postgresql":
        return col == any_(bindparam("ids", ids, type_=ARRAY(BigInteger)))
    return col.in_(ids)


def _hydrate(session: Session, q: str, page: list[Hit]) -> None:
    """Fill in what a result shows: the object, its entry and a highlighted snippet."""
    if not page:
        return
    ids = [h.object_id for h in page]
    rows = {r.id: r._asdict() for r in session.execute(
        select(OBJ.id, OBJ.cid, OBJ.size, OBJ.tags, OBJ.created_at, DOC.name, DOC.title, DOC.media_type,
               DOC.metadata_only, DOC.indexed_at)
        .join(SearchDocument.__table__, DOC.object_id == OBJ.id).where(OBJ.id.in_(ids)))}
    chunks = {h.object_id: h.text_chunk or h.vector_chunk for h in page}
    snippets = _snippets(session, q, [c for c in chunks.values() if c is not None])
    for h in page:
        h.row = rows.get(h.object_id, {})
        h.row["snippet"] = snippets.get(chunks[h.object_id] or -1, "")
        h.row["chunk"] = chunks[h.object_id]
    page[:] = [h for h in page if "cid" in h.row]  # removed while we searched


def _snippets(session: Session, q: str, chunk_ids: list[int]) -> dict[int, str]:
    if not chunk_ids:
        return {}
    dialect = session.get_bind().dialect.name
    out: dict[int, str] = {}
    if dialect == "postgresql":
        tsq = func.websearch_to_tsquery(literal(get_settings().search_language, REGCONFIG), q)
        options = (f"StartSel={START}, StopSel={STOP}, MaxWords={SNIPPET_WORDS}, MinWords=12, "
                   "MaxFragments=2, FragmentDelimiter=\" … \"")
        headline = func.ts_headline(literal(get_settings().search_language, REGCONFIG), CHUNK.body, tsq, options)
        for cid, snip in session.execute(select(CHUNK.id, headline).where(CHUNK.id.in_(chunk_ids))):
            out[cid] = snip
    else:
        fts_q = fts5_query(q)
        if fts_q is not None:
            snippet = func.snippet(literal_column("search_fts"), 3, START, STOP, "…", SNIPPET_WORDS)
            for cid, snip in session.execute(select(FTS.c.rowid, snippet).where(
                    FTS.c.search_fts.op("MATCH")(fts_q), FTS.c.rowid.in_(chunk_ids))):
                if START in snip:
                    out[cid] = snip
        rest = [c for c in chunk_ids if c not in out]
        if rest:
            for cid, body in session.execute(select(CHUNK.id, CHUNK.body).where(CHUNK.id.in_(rest))):
                words = body.split()
                out[cid] = " ".join(words[:SNIPPET_WORDS]) + (" …" if len(words) > SNIPPET_WORDS else "")
    return {cid: _safe(snip) for cid, snip in out.items()}


def _safe(snippet: str) -> str:
    text = " ".join(snippet.split())
    return html.escape(text, quote=False).replace(START, "<mark>").replace(STOP, "</mark>")


# Postgres' English stop words (snowball), which websearch_to_tsquery drops: FTS5 indexes
# every word, so without this "how to prune roses" would demand "how" and "to".
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself
it its itself they them their theirs themselves what which who whom this that these those am is are was were be
been being have has had having do does did doing a an the and but if or because as until while of at by for with
about against between into through during before after above below to from up down in out on off over under again
further then once here there when where why how all any both each few more most other some such no nor not only own
same so than too very s t can will just don should now
""".split())
_TOKEN = re.compile(r'"([^"]*)"?|(\S+)')
_WORD_CHARS = re.compile(r"\w+", re.UNICODE)


def fts5_query(q: str) -> str | None:
    """The FTS5 query for a web-search-style query, as websearch_to_tsquery reads it:
    words are ANDed, "quoted text" is a phrase, `or` between terms, a leading `-`
    excludes. None when nothing searchable is left (the query then matches nothing)."""
    groups: list[list[str]] = [[]]   # OR-groups, ANDed together
    excluded: list[str] = []
    pending_or = False
    for m in _TOKEN.finditer(q):
        phrase, word = m.group(1), m.group(2)
        negate = False
        if word is not None:
            if word.lower() == "or":
                pending_or = bool(groups[-1])
                continue
            if word.startswith("-"):
                negate, word = True, word[1:]
            words = _WORD_CHARS.findall(word)
        else:
            words = _WORD_CHARS.findall(phrase or "")
        words = [w for w in words if w.lower() not in STOP_WORDS]
        if not words:
            continue
        term = '"' + " ".join(w.replace('"', "") for w in words) + '"'
        if negate:
            excluded.append(term)
        elif pending_or:
            groups[-1].append(term)
        else:
            if groups[-1]:
                groups.append([])
            groups[-1].append(term)
        pending_or = False
    groups = [g for g in groups if g]
    if not groups:
        return None
    query = " AND ".join(g[0] if len(g) == 1 else "(" + " OR ".join(g) + ")" for g in groups)
    if excluded:
        query += " NOT " + (excluded[0] if len(excluded) == 1 else "(" + " OR ".join(excluded) + ")")
    return query
