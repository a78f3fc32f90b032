"""Access to the API: who is calling (authentication on every request but the health
checks), the audit log of every mutating call and every refused one, and the admin
endpoints /v1/keys and /v1/audit. Authorization itself is ferry.security's."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Flask, Response, g, jsonify, request
from sqlalchemy import String, cast, select, update

from api.openapi import operation
from api.schemas import (
    AuditEntryOut,
    AuditList,
    AuditQuery,
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
)
from ferry import security
from ferry.catalog.db import transaction
from ferry.catalog.models import ApiKey, AuditEntry, Role, utcnow
from ferry.errors import NotFound
from ferry.security import KEY_PREFIX, Principal, Unauthenticated

log = logging.getLogger(__name__)

keys_bp = Blueprint("keys", __name__, url_prefix="/v1/keys")
audit_bp = Blueprint("audit", __name__, url_prefix="/v1/audit")

# The piece server checks its own per-deal tokens (api/deals.py).
PUBLIC_ENDPOINTS = {"health.healthz", "health.readyz", "pieces.piece"}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


class KeyNotFound(NotFound):
    code = "key_not_found"


def note(**fields: Any) -> None:
    """What a view touched, for its audit entry: job_id, policy, backends, cid, detail."""
    g.setdefault("audit", {}).update({k: v for k, v in fields.items() if v is not None})


def current() -> Principal:
    return g.principal


def bearer() -> str | None:
    """The credentials of this request: a bearer token, or an X-API-Key header."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key") or None


def authenticate() -> None:
    g.principal = None
    if request.endpoint in PUBLIC_ENDPOINTS:
        return
    limits = security.rate_limits()
    try:
        g.principal = principal_of(bearer())
    except Unauthenticated:
        limits.failed_authentication(request.remote_addr or "unknown")  # guessing is slowed down
        raise
    limits.caller(g.principal)


def principal_of(token: str | None) -> Principal:
    """Who `token` (an API key or an OIDC token) stands for; Unauthenticated when nobody."""
    if token is None:
        raise Unauthenticated("credentials are needed: send 'Authorization: Bearer <API key>'")
    if token.startswith(KEY_PREFIX):
        with transaction() as session:
            return security.authenticate_key(session, token)
    from ferry import oidc

    return oidc.authenticate(token)


def record(response: Response) -> Response:
    """Append the audit entry of a mutating call or a refused one."""
    status = response.status_code
    if request.method not in MUTATING and status not in (401, 403):
        return response
    principal: Principal | None = g.get("principal")
    notes: dict[str, Any] = g.get("audit", {})
    args = request.view_args or {}
    outcome = ("unauthenticated" if status == 401 else "denied" if status == 403
               else "ok" if status < 400 else "failed")
    detail = notes.get("detail")
    if detail is None and status >= 400 and response.is_json:
        detail = ((response.get_json(silent=True) or {}).get("error") or {}).get("message")
    entry = AuditEntry(
        actor=principal.id if principal else None, actor_kind=principal.kind if principal else None,
        role=principal.role.value if principal else None, client=(request.remote_addr or "")[:64],
        method=request.method, path=request.path[:2048], action=request.endpoint, status=status,
        outcome=outcome, job_id=notes.get("job_id") or args.get("job_id"),
        policy=notes.get("policy") or (args.get("name") if request.blueprint == "policies" else None),
        backends=sorted(set(notes.get("backends", []))), cid=notes.get("cid") or args.get("cid"),
        detail=(detail or "")[:2000] or None)
    try:
        with transaction() as session:
            session.add(entry)
    except Exception:  # the call's effect is done; its record must not vanish silently
        log.exception("could not write the audit entry of %s %s (%s, %s)", request.method, request.path,
                      outcome, principal.id if principal else "anonymous")
    return response


def install(app: Flask) -> None:
    app.before_request(authenticate)
    app.after_request(record)
    app.register_blueprint(keys_bp)
    app.register_blueprint(audit_bp)


# -- /v1/keys ------------------------------------------------------------------------------


def key_out(row: ApiKey) -> dict[str, Any]:
    return KeyOut.model_validate(row, from_attributes=True).model_dump(mode="json")


@operation(keys_bp, "", "POST", summary="Create an API key (the key is in this answer only)", body=KeyCreate,
           responses={201: KeyCreated}, permission="admin")
def create_key(body: KeyCreate):
    with transaction() as session:
        row, key = security.create_key(session, name=body.name, role=Role(body.role),
                                       grants=[gr.model_dump() for gr in body.grants], expires_at=body.expires_at,
                                       created_by=current().id)
        note(detail=f"key {row.prefix} ({row.role.value}) created")
        return jsonify({**key_out(row), "key": key}), 201


@operation(keys_bp, "", "GET", summary="List API keys (never the keys themselves)", responses={200: KeyList},
           permission="admin")
def list_keys():
    with transaction() as session:
        rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
        return jsonify({"keys": [key_out(r) for r in rows]})


@operation(keys_bp, "/<prefix>", "DELETE", summary="Revoke an API key at once", responses={200: KeyOut},
           permission="admin")
def revoke_key(prefix: str):
    with transaction() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).first()
        if row is None:
            raise KeyNotFound(f"no API key with prefix {prefix!r}")
        if row.revoked_at is None:
            session.execute(update(ApiKey).where(ApiKey.id == row.id).values(revoked_at=utcnow()))
            session.refresh(row)
        note(detail=f"key {prefix} revoked")
        return jsonify(key_out(row))


# -- /v1/audit -----------------------------------------------------------------------------


@operation(audit_bp, "", "GET", summary="The audit log, newest first, filtered", query=AuditQuery,
           responses={200: AuditList}, permission="admin")
def audit(query: AuditQuery):
    a = AuditEntry
    stmt = select(a).order_by(a.id.desc()).limit(query.limit)
    for column, value in ((a.actor, query.actor), (a.outcome, query.outcome), (a.action, query.action),
                          (a.job_id, query.job_id), (a.policy, query.policy), (a.cid, query.cid)):
        if value is not None:
            stmt = stmt.where(column == value)
    if query.since is not None:
        stmt = stmt.where(a.at >= query.since)
    if query.until is not None:
        stmt = stmt.where(a.at < query.until)
    if query.before_id is not None:
        stmt = stmt.where(a.id < query.before_id)
    if query.backend is not None:  # a JSON list of names: its text holds "name" (same on both databases)
        stmt = stmt.where(cast(a.backends, String).contains(f'"{query.backend}"', autoescape=True))
    with transaction() as session:
        rows = session.scalars(stmt).all()
        entries = [AuditEntryOut.model_validate(r, from_attributes=True).model_dump(mode="json") for r in rows]
    next_id = rows[-1].id if len(rows) == query.limit and rows else None
    return jsonify({"entries": entries, "next_before_id": next_id})
