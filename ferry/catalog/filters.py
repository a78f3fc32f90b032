"""Conditions on objects shared by policy selectors and search filters, in SQL that
renders on Postgres (JSONB containment) and SQLite (JSON functions)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, literal, or_, select, true
from sqlalchemy.dialects.postgresql import JSONB

from ferry.catalog.models import Replica, ReplicaState, StoredObject

OBJ = StoredObject.__table__.c
REP = Replica.__table__.c


def has_tags(dialect: str, tags: Iterable[str]) -> ColumnElement[bool]:
    """The object has every one of the tags."""
    tags = sorted(set(tags))
    if not tags:
        return true()
    if dialect == "postgresql":
        return OBJ.tags.op("@>")(literal(tags, JSONB))
    clauses = []
    for tag in tags:
        each = func.json_each(OBJ.tags).table_valued("value")
        clauses.append(exists(select(1).select_from(each).where(each.c.value == tag)))
    return and_(*clauses)


def has_metadata(dialect: str, metadata: Mapping[str, Any]) -> ColumnElement[bool]:
    """Each metadata key equals the value."""
    if not metadata:
        return true()
    if dialect == "postgresql":
        return OBJ.metadata.op("@>")(literal(dict(metadata), JSONB))
    clauses = []
    for key, value in metadata.items():
        path = '$."' + key.replace('"', '\\"') + '"'
        want: Any = int(value) if isinstance(value, bool) else value
        clauses.append(func.json_extract(OBJ.metadata, path) == want)
    return and_(*clauses)


def media_type_is(pattern: str, column: Any = OBJ.media_type) -> ColumnElement[bool]:
    """Exact ("text/csv") or a whole type ("text/*")."""
    if pattern.endswith("/*"):
        whole_type = pattern[:-1]  # "text/"
        return func.substr(column, 1, len(whole_type)) == whole_type
    return column == pattern


def media_type_in(patterns: Iterable[str], column: Any = OBJ.media_type) -> ColumnElement[bool]:
    patterns = list(patterns)
    return or_(*(media_type_is(p, column) for p in patterns)) if patterns else true()


def stored_on(backends: Iterable[str]) -> ColumnElement[bool]:
    """The object has a verified replica on one of the backends."""
    return exists(select(1).select_from(Replica.__table__).where(
        REP.object_id == OBJ.id, REP.backend.in_(sorted(set(backends))), REP.state == ReplicaState.present))
