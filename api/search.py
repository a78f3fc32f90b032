"""/v1/search: full-text, vector and hybrid search over indexed objects; and each
object's extracted text (/v1/objects/{cid}/text, in api.objects).

Results only name objects the caller may read: a verified replica on a backend the
caller's grants allow (admins: all), as for the object's content, since snippets are
content."""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.access import current
from api.openapi import operation
from api.schemas import SearchHit, SearchRequest, SearchResponse
from ferry.catalog.db import transaction
from ferry.search.query import Filters, search
from ferry.security import Principal
from ferry.settings import get_settings

bp = Blueprint("search", __name__, url_prefix="/v1/search")


def readable(principal: Principal) -> list[str] | None:
    """The backends the caller may read, or None when that is every one."""
    names = sorted(get_settings().backends())
    allowed = [b for b in names if principal.may(b, "read")]
    return None if len(allowed) == len(names) else allowed


@operation(bp, "", "POST", summary="Search indexed objects: full-text, vector or hybrid (reciprocal rank fusion)",
           body=SearchRequest, responses={200: SearchResponse, 503: None}, permission="read")
def query(body: SearchRequest):
    f = body.filters
    filters = Filters(tags=f.tags, media_types=f.media_type, metadata=dict(f.metadata), backends=f.backend,
                      readable=readable(current()), created_after=f.created_after, created_before=f.created_before,
                      indexed_after=f.indexed_after, indexed_before=f.indexed_before)
    with transaction() as session:
        result = search(session, body.query, mode=body.mode, filters=filters, limit=body.limit, offset=body.offset,
                        weight=body.weight)
    hits = [SearchHit(cid=h.row["cid"], name=h.row["name"], title=h.row["title"], media_type=h.row["media_type"],
                      size=h.row["size"], tags=list(h.row["tags"] or []), created_at=h.row["created_at"],
                      indexed_at=h.row["indexed_at"], metadata_only=h.row["metadata_only"],
                      score=h.score if body.mode == "hybrid" else (h.text_score if body.mode == "text"
                                                                     else h.vector_score) or 0.0,
                      text_rank=h.text_rank, vector_rank=h.vector_rank, snippet=h.row["snippet"],
                      chunk=h.row["chunk"]) for h in result.hits]
    out = SearchResponse(query=body.query, mode=body.mode, hits=hits, offset=body.offset,
                         next_offset=result.next_offset, took_ms=round(result.took_ms, 2),
                         vector_generation=result.vector_generation)
    return jsonify(out.model_dump(mode="json"))
