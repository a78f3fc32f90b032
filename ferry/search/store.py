"""Writing and removing search entries: a document, its chunks and their full-text rows.

Postgres: each chunk's `tsv` is set in the INSERT from the document's name/title (weight
A), tags (B) and metadata + the chunk's text (C) in FERRY_SEARCH_LANGUAGE, under a GIN
index. SQLite: the same fields go to the FTS5 table `search_fts` under the chunk's rowid
(porter stemming; BM25 weights alike); a trigger removes them with the chunk. Every
function takes the caller's session and does not commit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.orm import Session

from ferry.catalog.models import SearchChunk, SearchDocument, utcnow
from ferry.settings import get_settings


@dataclass(frozen=True, slots=True)
class Entry:
    """What indexing made of one object, ready to store."""

    object_id: int
    fingerprint: str
    name: str | None
    title: str | None
    media_type: str
    metadata_only: bool
    truncated: bool
    reason: str | None
    body: str
    tags: list[str]
    meta_text: str                 # the object's metadata as "key value" words
    chunks: list[str]
    embeddings: list[bytes]        # one float32 vector per chunk
    model: str
    source_backend: str | None


_SEPARATORS = re.compile(r"[/\\._\-:]+")


def _words(name: str | None) -> str | None:
    """A key as words ("docs/2024/tomato-care.md" -> "docs 2024 tomato care md"): Postgres'
    parser would read a path as one token, and nobody searches for the whole path."""
    return _SEPARATORS.sub(" ", name) if name else name


def fingerprints(session: Session, object_ids: Iterable[int]) -> dict[int, str]:
    ids = list(object_ids)
    if not ids:
        return {}
    d = SearchDocument.__table__.c
    return dict(session.execute(select(d.object_id, d.fingerprint).where(d.object_id.in_(ids))).all())


def mark_fresh(session: Session, object_ids: Sequence[int]) -> None:
    """The entries are as they would be made again: clear their stale flag."""
    if object_ids:
        session.execute(update(SearchDocument).where(SearchDocument.object_id.in_(object_ids))
                        .values(stale=False).execution_options(synchronize_session=False))


def mark_stale(session: Session, object_ids: Iterable[int]) -> None:
    """The objects' labels changed: their entries are to be made again (by a reconcile pass
    of an indexing policy, or the next index job)."""
    ids = list(object_ids)
    if ids:
        session.execute(update(SearchDocument).where(SearchDocument.object_id.in_(ids))
                        .values(stale=True).execution_options(synchronize_session=False))


def remove(session: Session, object_ids: Iterable[int]) -> int:
    """Drop the objects' entries from both indexes (chunks go, and with them their text
    rows and, at the next publish, their vectors); returns how many documents went."""
    ids = list(object_ids)
    if not ids:
        return 0
    session.execute(delete(SearchChunk).where(SearchChunk.object_id.in_(ids)).execution_options(
        synchronize_session=False))
    return session.execute(delete(SearchDocument).where(SearchDocument.object_id.in_(ids)).execution_options(
        synchronize_session=False)).rowcount or 0


def replace(session: Session, entries: Sequence[Entry]) -> None:
    """Store the entries, replacing what the objects had (their old chunk ids are gone for good)."""
    if not entries:
        return
    remove(session, [e.object_id for e in entries])
    now = utcnow()
    session.execute(insert(SearchDocument), [
        {"object_id": e.object_id, "fingerprint": e.fingerprint, "stale": False, "name": e.name, "title": e.title,
         "media_type": e.media_type, "metadata_only": e.metadata_only, "truncated": e.truncated,
         "reason": e.reason, "body": e.body, "chunks": len(e.chunks), "model": e.model,
         "source_backend": e.source_backend, "indexed_at": now}
        for e in entries])
    rows = [{"object_id": e.object_id, "seq": i, "body": body, "embedding": vec,
             "heading": " ".join(filter(None, [_words(e.name), e.title])), "tags": " ".join(e.tags),
             "meta": e.meta_text}
            for e in entries for i, (body, vec) in enumerate(zip(e.chunks, e.embeddings, strict=True))]
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(
            "INSERT INTO search_chunks (object_id, seq, body, embedding, tsv) VALUES "
            "(:object_id, :seq, :body, :embedding, "
            "setweight(to_tsvector(CAST(:cfg AS regconfig), :heading), 'A') || "
            "setweight(to_tsvector(CAST(:cfg AS regconfig), :tags), 'B') || "
            "setweight(to_tsvector(CAST(:cfg AS regconfig), :meta || ' ' || :body), 'C'))"),
            [dict(r, cfg=get_settings().search_language) for r in rows])
    else:
        session.execute(insert(SearchChunk), [
            {k: r[k] for k in ("object_id", "seq", "body", "embedding")} for r in rows])
        ids = {(o, s): i for i, o, s in session.execute(
            select(SearchChunk.id, SearchChunk.object_id, SearchChunk.seq)
            .where(SearchChunk.object_id.in_({e.object_id for e in entries})))}
        session.execute(text("INSERT INTO search_fts (rowid, title, tags, meta, body) "
                             "VALUES (:id, :heading, :tags, :meta, :body)"),
                        [{"id": ids[(r["object_id"], r["seq"])], "heading": r["heading"], "tags": r["tags"],
                          "meta": r["meta"], "body": r["body"]} for r in rows])
