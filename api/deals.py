"""/v1/deals, /v1/providers, /v1/pieces: Filecoin deals and their quotes, the storage
providers Ferry may choose, and the piece server providers fetch prepared CARs from."""

from __future__ import annotations

import hmac
from pathlib import Path

from flask import Blueprint, jsonify, request, send_file
from pydantic import ValidationError
from sqlalchemy import select

from api.access import current, note
from api.openapi import operation
from api.schemas import (
    DealList,
    DealOut,
    DealQuery,
    DealRetryOut,
    DealScheduleIn,
    DealScheduleList,
    DealScheduleOut,
    ProviderIn,
    ProviderList,
    ProviderOut,
    QuoteOut,
    QuoteRequest,
)
from ferry import security
from ferry.catalog import deals as catalog
from ferry.catalog.db import after_commit, transaction
from ferry.catalog.models import (
    ENDED_DEAL_STATES,
    Deal,
    DealSchedule,
    DealState,
    Piece,
    PieceObject,
    Provider,
    ProviderAccess,
    StoredObject,
    utcnow,
)
from ferry.errors import Conflict, InvalidRequest, NotFound, UnknownBackend
from ferry.security import Unauthenticated, require_backends
from ferry.settings import get_settings
from tasks import deals as deal_tasks

bp = Blueprint("deals", __name__, url_prefix="/v1/deals")
providers_bp = Blueprint("providers", __name__, url_prefix="/v1/providers")
pieces_bp = Blueprint("pieces", __name__, url_prefix="/v1/pieces")
schedules_bp = Blueprint("schedules", __name__, url_prefix="/v1/deal-schedules")


def deal_out(deal: Deal, piece: Piece, objects: list[str] | None = None) -> dict:
    fields = {c: getattr(deal, c) for c in DealOut.model_fields if hasattr(deal, c)}
    fields.update(state=deal.state.value, piece_cid=piece.piece_cid, padded_size=piece.padded_size,
                  car_size=piece.car_size, objects=objects or [])
    return DealOut(**fields).model_dump(mode="json")


@operation(bp, "", "GET", summary="Deals, newest first, filtered by state, provider, piece, object or job",
           query=DealQuery, responses={200: DealList})
def index(query: DealQuery):
    q = select(Deal, Piece).join(Piece, Piece.id == Deal.piece_id).order_by(Deal.created_at.desc(), Deal.id)
    if query.state is not None:
        q = q.where(Deal.state == DealState(query.state))
    if query.provider is not None:
        q = q.where(Deal.provider == query.provider)
    if query.piece is not None:
        q = q.where(Piece.piece_cid == query.piece)
    if query.job_id is not None:
        q = q.where(Deal.job_id == query.job_id)
    if query.before is not None:
        q = q.where(Deal.created_at < query.before)
    if query.cid is not None:
        q = q.where(Deal.piece_id.in_(select(PieceObject.piece_id).join(StoredObject, StoredObject.id ==
                                                                        PieceObject.object_id)
                                      .where(StoredObject.cid == query.cid)))
    with transaction() as session:
        rows = session.execute(q.limit(query.limit)).all()
        deals = [deal_out(d, p) for d, p in rows]
    after = rows[-1][0].created_at if len(rows) == query.limit else None
    return jsonify(DealList(deals=deals, next_before=after).model_dump(mode="json"))


@operation(bp, "/<deal_id>", "GET", summary="One deal, with the objects of its piece", responses={200: DealOut})
def get(deal_id: str):
    with transaction() as session:
        deal = catalog.get_deal(session, deal_id)
        piece = session.get(Piece, deal.piece_id)
        cids = list(session.scalars(select(StoredObject.cid).join(PieceObject, PieceObject.object_id == StoredObject.id)
                                    .where(PieceObject.piece_id == piece.id).order_by(StoredObject.cid)))
        return jsonify(deal_out(deal, piece, cids))


@operation(bp, "/<deal_id>/retry", "POST", summary="Make that copy again with another provider (an ended deal)",
           responses={200: DealRetryOut, 409: None})
def retry(deal_id: str):
    with transaction() as session:
        deal = catalog.get_deal(session, deal_id, lock=True)
        note(backends=[deal.backend])
        require_backends(current(), "write", [deal.backend])
        if deal.state not in ENDED_DEAL_STATES:
            raise Conflict(f"deal {deal.id} is {deal.state.value}: only a rejected, failed, slashed or expired deal "
                           "is retried")
        _, backend = deal_tasks.filecoin_backend(deal.backend)
        planned = deal_tasks.retry_deal(session, deal, backend.config, manual=True)
        if not planned:
            raise Conflict(f"deal {deal.id} cannot be retried: {deal.error}")
        ids = [d.id for d in planned]
        after_commit(session, lambda: deal_tasks.send_propose(deal.backend, ids))
        return jsonify({"planned": [str(i) for i in ids]})


@operation(bp, "/quote", "POST", summary="Estimate what deals of a selection would cost, before any proposal",
           body=QuoteRequest, responses={200: QuoteOut}, permission="read")
def quote(body: QuoteRequest):
    require_backends(current(), "read", [body.source.backend])
    result = deal_tasks.quote(body.source.backend, body.source.keys, body.source.prefix, body.backend,
                              body.deal.model_dump(exclude_none=True), body.duration)
    return jsonify(QuoteOut(**result).model_dump(mode="json"))


# -- providers -------------------------------------------------------------------------------


def provider_out(p: Provider, rep: catalog.Reputation) -> dict:
    fields = {c: getattr(p, c) for c in ProviderOut.model_fields if c not in ("reputation", "access")}
    return ProviderOut(**fields, access=p.access.value, reputation=rep.as_dict()).model_dump(mode="json")


@operation(providers_bp, "", "GET", summary="Storage providers with their terms and reputation",
           responses={200: ProviderList})
def providers():
    with transaction() as session:
        rows = list(session.scalars(select(Provider).order_by(Provider.id)))
        reps = catalog.reputations(session)
        return jsonify({"providers": [provider_out(p, reps.get(p.id, catalog.Reputation())) for p in rows]})


@operation(providers_bp, "/<provider_id>", "GET", summary="One storage provider", responses={200: ProviderOut})
def provider(provider_id: str):
    with transaction() as session:
        p = session.get(Provider, provider_id)
        if p is None:
            raise catalog.ProviderNotFound(f"no provider {provider_id!r}")
        return jsonify(provider_out(p, catalog.reputations(session, [p.id]).get(p.id, catalog.Reputation())))


@operation(providers_bp, "", "PUT", summary="Add a storage provider or change its terms or access",
           body=ProviderIn, responses={200: ProviderOut}, permission="admin")
def put_provider(body: ProviderIn):
    if body.min_piece_size > body.max_piece_size:
        raise InvalidRequest("min_piece_size is larger than max_piece_size", field="min_piece_size")
    if body.retrieval_url is not None:
        from workers.filecoin import _url

        try:
            _url(body.retrieval_url)
        except ValueError as exc:
            raise InvalidRequest(str(exc), field="retrieval_url") from None
    with transaction() as session:
        p = session.get(Provider, body.id)
        if p is None:
            p = Provider(id=body.id, created_at=utcnow())
            session.add(p)
        for k, v in body.model_dump().items():
            setattr(p, k, ProviderAccess(v) if k == "access" else v)
        p.updated_at = utcnow()
        session.flush()
        note(detail=f"provider {p.id}: access {p.access.value}, price {p.price}, verified price {p.verified_price}")
        return jsonify(provider_out(p, catalog.reputations(session, [p.id]).get(p.id, catalog.Reputation())))


# -- the piece server --------------------------------------------------------------------


class PieceNotFound(NotFound):
    """Raised when no prepared piece has the given piece CID (or its CAR is gone)."""

    code = "piece_not_found"


@operation(pieces_bp, "/<piece_cid>", "GET", summary="A prepared piece's CAR, for a provider making an online "
           "deal (the per-deal token as 'Authorization: Bearer fyd_...'; Range requests)",
           responses={200: None, 206: None, 401: None, 404: None}, permission="public")
def piece(piece_cid: str):
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not token.startswith(deal_tasks.TOKEN_PREFIX):
        security.rate_limits().failed_authentication(request.remote_addr or "unknown")
        raise Unauthenticated("a piece is fetched with its deal's token: 'Authorization: Bearer fyd_...'")
    digest = catalog.token_hash(token)
    with transaction() as session:
        row = session.execute(
            select(Piece, Deal.token_hash).join(Deal, Deal.piece_id == Piece.id)
            .where(Piece.piece_cid == piece_cid, Deal.token_hash == digest,
                   Deal.state.in_([DealState.planned, DealState.proposed, DealState.published]))).first()
    if row is None or not hmac.compare_digest(row[1], digest):
        security.rate_limits().failed_authentication(request.remote_addr or "unknown")
        raise Unauthenticated("no deal in flight for this piece has that token")
    path = row[0].path
    if path is None or not Path(path).is_file():
        raise PieceNotFound(f"piece {piece_cid}'s CAR is no longer kept here")
    note(detail=f"piece {piece_cid} fetched ({request.headers.get('Range', 'whole')})")
    return send_file(path, mimetype="application/vnd.ipld.car", conditional=True, etag=piece_cid,
                     download_name=f"{piece_cid}.car", max_age=0)


# -- deal schedules --------------------------------------------------------------------------


def schedule_out(session, row: DealSchedule) -> dict:
    pending, made, made_bytes = deal_tasks.schedule_counts(session, row.name)
    return DealScheduleOut(name=row.name, spec=row.spec, paused=row.paused, next_run_at=row.next_run_at,
                           last_run_at=row.last_run_at, last_error=row.last_error, pending=pending, made=made,
                           made_bytes=made_bytes).model_dump(mode="json")


def _schedule(session, name: str, lock: bool = False) -> DealSchedule:
    row = session.get(DealSchedule, name, with_for_update=lock)
    if row is None:
        raise ScheduleNotFound(f"no deal schedule {name!r}")
    return row


class ScheduleNotFound(NotFound):
    """Raised when no deal schedule has the given name."""

    code = "schedule_not_found"


@operation(schedules_bp, "", "PUT", summary="Create or replace a deal schedule", body=DealScheduleIn,
           responses={200: DealScheduleOut})
def put_schedule(body: DealScheduleIn):
    from policies.schema import Schedule

    note(backends=[body.source.backend, body.backend])
    require_backends(current(), "read", [body.source.backend])
    require_backends(current(), "write", [body.backend])
    try:
        timing = Schedule.model_validate(body.schedule)
    except ValidationError as exc:
        raise InvalidRequest(exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, "),
                             field="schedule") from None
    if timing.kind not in ("cron", "interval"):
        raise InvalidRequest('a deal schedule runs on a timetable: {"cron": "..."} or {"every": "..."}',
                             field="schedule")
    if body.source.prefix is None or body.source.keys is not None:
        raise InvalidRequest("a deal schedule selects by prefix", field="source.prefix")
    backends = get_settings().backends()
    if body.source.backend not in backends:
        raise UnknownBackend(f"unknown backend {body.source.backend!r}", field="source.backend")
    spec = backends.get(body.backend)
    if spec is None or spec.driver != "filecoin":
        raise InvalidRequest(f"{body.backend!r} is not a filecoin backend", field="backend")
    now = utcnow()
    doc = body.model_dump(mode="json", exclude={"name", "paused"})
    doc["schedule"] = timing.model_dump(mode="json")
    with transaction() as session:
        row = session.get(DealSchedule, body.name, with_for_update=True)
        if row is None:
            row = DealSchedule(name=body.name, created_at=now)
            session.add(row)
        row.backend, row.spec, row.paused, row.updated_at = body.backend, doc, body.paused, now
        row.next_run_at = now if timing.kind == "interval" else timing.next_run_after(now)
        session.flush()
        note(detail=f"deal schedule {row.name}")
        return jsonify(schedule_out(session, row))


@operation(schedules_bp, "", "GET", summary="Deal schedules with their progress", responses={200: DealScheduleList})
def schedules():
    with transaction() as session:
        rows = session.scalars(select(DealSchedule).order_by(DealSchedule.name)).all()
        return jsonify({"schedules": [schedule_out(session, r) for r in rows]})


@operation(schedules_bp, "/<name>", "GET", summary="One deal schedule", responses={200: DealScheduleOut})
def schedule(name: str):
    with transaction() as session:
        return jsonify(schedule_out(session, _schedule(session, name)))


def _set_paused(name: str, paused: bool):
    with transaction() as session:
        row = _schedule(session, name, lock=True)
        require_backends(current(), "write", [row.backend])
        row.paused, row.updated_at = paused, utcnow()
        if not paused and row.next_run_at is None:
            row.next_run_at = utcnow()
        return jsonify(schedule_out(session, row))


@operation(schedules_bp, "/<name>/pause", "POST", summary="Pause a deal schedule (its deals go on)",
           responses={200: DealScheduleOut})
def pause_schedule(name: str):
    return _set_paused(name, True)


@operation(schedules_bp, "/<name>/resume", "POST", summary="Resume a paused deal schedule",
           responses={200: DealScheduleOut})
def resume_schedule(name: str):
    return _set_paused(name, False)


@operation(schedules_bp, "/<name>", "DELETE", summary="Remove a deal schedule (its deals go on)",
           responses={200: DealScheduleOut})
def delete_schedule(name: str):
    with transaction() as session:
        row = _schedule(session, name, lock=True)
        require_backends(current(), "write", [row.backend])
        out = schedule_out(session, row)
        session.delete(row)
        return jsonify(out)
