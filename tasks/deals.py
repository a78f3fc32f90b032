"""The deal verb: pack objects into pieces, choose providers, propose deals, track them
on chain, retry refused ones elsewhere and renew them before they end.

* A deal job's items (action `deal`, on the filecoin backend's queue) are packed into
  CAR pieces of at most the backend's `piece_size` (workers.piece), each object streamed
  from a verified replica and checked against its CID; each piece gets `copies` deals
  with distinct providers (ferry.catalog.deals.choose), stored `planned`, then proposed
  after that commits (`ferry.deals.propose`).
* A proposal carries a per-deal token for the piece URL (only its hash is kept); verified
  deals check the client's datacap first (DatacapShort: no proposal is sent).
* `ferry.deals.track` (beat) asks the deal tool what became of open deals, and the chain
  whether published ones are really there, sealed and unslashed: only the chain makes a
  deal `active`. Rejected, failed and slashed deals are retried with another provider up
  to `max_attempts` proposals per copy; a deal within `renew_before` epochs of its end is
  `expiring` and gets one renewal. Objects of pieces with a live deal are replicas on the
  filecoin backend (key: CID), read back through the providers' trustless retrieval.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import object_session

from ferry.catalog import deals as catalog
from ferry.catalog import jobs as job_catalog
from ferry.catalog.db import transaction
from ferry.catalog.models import (
    LIVE_DEAL_STATES,
    OPEN_DEAL_STATES,
    Deal,
    DealSchedule,
    DealState,
    ItemAction,
    ItemState,
    Job,
    JobItem,
    JobKind,
    Piece,
    PieceObject,
    Policy,
    Provider,
    Replica,
    ReplicaState,
    StoredObject,
    utcnow,
)
from ferry.catalog.replicas import under_prefix
from ferry.errors import (
    BackendUnavailable,
    FerryError,
    InvalidRequest,
    UnknownBackend,
)
from ferry.settings import BackendSpec, get_settings
from tasks import jobs as job_tasks
from tasks import metrics
from tasks.app import app, backoff, queue_for
from workers import registry
from workers.commp import padded_piece_size
from workers.filecoin import (
    DatacapShort,
    DealRejected,
    FilecoinBackend,
    FilecoinConfig,
    GiB,
    Proposal,
)
from workers.piece import Entry, PieceWriter, car_bound
from workers.piece import plan as plan_pieces

if TYPE_CHECKING:
    from tasks.transfer import Plan

log = logging.getLogger(__name__)
TOKEN_PREFIX = "fyd_"


def filecoin_backend(name: str, field: str = "backend") -> tuple[BackendSpec, FilecoinBackend]:
    spec = get_settings().backends().get(name)
    if spec is None:
        raise UnknownBackend(f"unknown backend {name!r}", field=field)
    if spec.driver != "filecoin":
        raise InvalidRequest(f"backend {name!r} is a {spec.driver} backend, not a filecoin one", field=field)
    backend = registry.get(spec)
    attach_locator(backend)
    return spec, backend  # type: ignore[return-value]


def attach_locator(backend: Any) -> None:
    """Let a filecoin backend find the providers holding an object (catalog knowledge)."""
    if isinstance(backend, FilecoinBackend) and backend.locate is None:
        name = backend.name

        def locate(cid: str) -> list[str]:
            with transaction() as session:
                return catalog.retrieval_urls(session, name, cid)

        backend.locate = locate


@dataclass(frozen=True, slots=True)
class Terms:
    """A deal job's (or schedule's) choices, defaulting to the backend's settings."""

    copies: int
    verified: bool
    regions: tuple[str, ...] | None
    spread_regions: bool
    max_price: int | None

    @classmethod
    def of(cls, spec: dict, config: FilecoinConfig) -> Terms:
        deal = spec.get("deal", {})
        return cls(copies=deal.get("copies") or config.copies,
                   verified=config.verified if deal.get("verified") is None else deal["verified"],
                   regions=tuple(deal["regions"]) if deal.get("regions") else None,
                   spread_regions=bool(deal.get("spread_regions")),
                   max_price=deal.get("max_price"))


# -- preparing pieces (a deal job's batch) -------------------------------------------------


def run_batch(plan: Plan) -> dict[str, int]:
    """Pack a claimed batch of deal items into pieces and plan their deals."""
    from tasks.transfer import Item

    tally = {"done": 0, "skipped": 0, "failed": 0}
    outcomes: list[dict] = []

    def finish(item: Item, state: ItemState, error: str | None = None, size: int | None = None) -> None:
        if state == ItemState.failed and plan.kind == JobKind.reconcile:
            state = ItemState.stuck  # not planned again until `ferry policy retry`
        cid = plan.known[(item.source_backend, item.source_key)].cid \
            if (item.source_backend, item.source_key) in plan.known else None
        outcomes.append({"seq": item.seq, "state": state, "error": error, "size": size, "dest_key": cid})
        tally["failed" if state in (ItemState.failed, ItemState.stuck) else state.value] += 1

    items = list(plan.items)
    name = items[0].dest_backend
    try:
        _, backend = filecoin_backend(name)
    except FerryError as exc:
        for item in items:
            finish(item, ItemState.failed, exc.message)
        _commit(plan, outcomes)
        return tally
    config = backend.config
    with transaction() as session:
        spec = session.get(Job, plan.job_id).spec
        documents = {row.name: row.document for row in session.scalars(
            select(Policy).where(Policy.name.in_({i.policy for i in items if i.policy})))}
    by_terms: dict[Terms, list[Entry]] = {}
    for item in items:
        digest = plan.known.get((item.source_backend, item.source_key))
        if digest is None or (item.source_backend, item.source_key) not in plan.verified:
            finish(item, ItemState.failed, f"{item.source_backend}:{item.source_key}: no verified replica there "
                                           "to make a deal of")
            continue
        if item.policy is not None:
            if item.policy not in documents:
                finish(item, ItemState.failed, f"policy {item.policy!r} no longer exists")
                continue
            terms = Terms.of({"deal": documents[item.policy].get("filecoin", {})}, config)
        else:
            terms = Terms.of(spec, config)
        by_terms.setdefault(terms, []).append(Entry(digest.cid, digest.size, ref=item))
    proposals: list[uuid.UUID] = []
    for terms, entries in by_terms.items():
        entries = _not_yet_dealt(entries, name, terms.copies, finish)
        groups, too_big = plan_pieces(entries, config.piece_size)
        for e in too_big:
            finish(e.ref, ItemState.failed, f"{e.size} bytes do not fit a piece of {config.piece_size} bytes "
                                            "(piece_size of the filecoin backend)")
        for group in groups:
            try:
                _prepare(plan, name, config, terms, group, finish, proposals, spec.get("schedule"))
            except Exception as exc:  # a bug or an unmapped error: fail the group's items, keep the batch going
                log.exception("job %s: preparing a piece failed unexpectedly", plan.job_id)
                done = {o["seq"] for o in outcomes}
                for e in group:
                    if e.ref.seq not in done:
                        finish(e.ref, ItemState.failed, f"internal error: {type(exc).__name__}: {exc}")
    _commit(plan, outcomes)
    if proposals:
        send_propose(name, proposals)
    return tally


def _not_yet_dealt(entries: list[Entry], backend: str, copies: int, finish) -> list[Entry]:
    """Objects already in pieces with `copies` open or live deals are skipped."""
    if not entries:
        return entries
    with transaction() as session:
        ids = dict(session.execute(select(StoredObject.cid, StoredObject.id)
                                   .where(StoredObject.cid.in_([e.cid for e in entries]))).all())
        have = catalog.deal_copies_by_object(session, list(ids.values()), backend,
                                             OPEN_DEAL_STATES | LIVE_DEAL_STATES)
    out = []
    for e in entries:
        if have.get(ids.get(e.cid), 0) >= copies:
            finish(e.ref, ItemState.skipped, size=e.size)
        else:
            out.append(e)
    return out


def _prepare(plan: Plan, name: str, config: FilecoinConfig, terms: Terms, group: list[Entry], finish,
             proposals: list[uuid.UUID], schedule: str | None = None) -> None:
    piece_dir = Path(config.piece_dir)
    while group:
        tmp = piece_dir / f"prepare-{uuid.uuid4().hex}.car"
        writer = PieceWriter(tmp, [e.cid for e in group])
        bad: Entry | None = None
        try:
            for e in group:
                try:
                    src = source_backend(e.ref.source_backend)
                    writer.add(e.cid, src.read(e.ref.source_key))
                except FerryError as exc:
                    bad = e
                    finish(e.ref, ItemState.failed, f"{e.ref.source_backend}:{e.ref.source_key}: {exc.message}")
                    break
            if bad is None:
                piece = writer.finish()
        finally:
            if bad is not None:
                writer.abort()
        if bad is not None:
            group = [e for e in group if e is not bad]  # the rest go in a piece without it
            continue
        final = piece_dir / f"{piece.cid}.car"
        tmp.replace(final)
        with transaction() as session:
            row = catalog.piece_of(session, piece.cid)
            if row is None:
                row = Piece(piece_cid=piece.cid, padded_size=piece.padded_size, car_size=piece.payload_size,
                            root_cid=group[0].cid, backend=name, path=str(final))
                session.add(row)
                session.flush()
                ids = session.execute(select(StoredObject.id).where(StoredObject.cid.in_([e.cid for e in group])))
                session.add_all([PieceObject(piece_id=row.id, object_id=oid) for (oid,) in ids])
            elif row.path is None:
                row.path = str(final)
            planned, reason = plan_copies(session, row, name, config, terms, job_id=plan.job_id,
                                          schedule=schedule)
            proposals += [d.id for d in planned]
            size = sum(e.size for e in group)
            for e in group:
                if planned or reason is None:
                    # Fewer copies than asked (too few eligible providers) is said on the item.
                    finish(e.ref, ItemState.done, reason and f"piece {piece.cid}: {reason}", size=e.size)
                else:
                    finish(e.ref, ItemState.failed, f"piece {piece.cid} is ready but no deal was planned: {reason}")
            log.info("piece %s: %d objects, %d bytes, padded %d; %d deals planned", piece.cid, len(group), size,
                     piece.padded_size, len(planned))
        return


def plan_copies(session, piece: Piece, backend: str, config: FilecoinConfig, terms: Terms, *,
                job_id: uuid.UUID | None = None, schedule: str | None = None,
                retry_of: Deal | None = None, renewal_of: Deal | None = None) -> tuple[list[Deal], str | None]:
    """Plan the deals that bring the piece to `terms.copies` open or live deals, with
    providers that do not hold it yet. Returns (deals planned, why fewer than wanted)."""
    holding, tried, let_down = catalog.piece_providers(session, piece.id)
    missing = terms.copies - len(holding)
    if retry_of is not None or renewal_of is not None:
        missing = 1
    if missing <= 0:
        return [], None
    # A retry goes to a provider the piece has not had; every deal avoids one that refused,
    # failed or lost it; a renewal may stay with the provider whose deal ends.
    exclude = holding | let_down | (tried if retry_of is not None else set())
    if renewal_of is not None:
        exclude.discard(renewal_of.provider)
    regions = {r for (r,) in session.execute(select(Provider.region).where(Provider.id.in_(holding)))}
    criteria = catalog.Criteria(padded_size=piece.padded_size, verified=terms.verified, regions=terms.regions,
                                max_price=terms.max_price, spread_regions=terms.spread_regions, exclude=exclude,
                                avoid_regions=regions if terms.spread_regions else set())
    chosen, reasons = catalog.choose(session, criteria, missing)
    deals = []
    for c in chosen:
        deal = Deal(id=uuid.uuid4(), piece_id=piece.id, backend=backend, provider=c.provider.id,
                    client=config.client, state=DealState.planned, verified=terms.verified,
                    duration=config.duration, job_id=job_id, schedule=schedule,
                    attempt=(retry_of.attempt + 1) if retry_of is not None else 1,
                    retry_of=retry_of.id if retry_of is not None else None,
                    renewal_of=renewal_of.id if renewal_of is not None else None,
                    created_at=utcnow(), updated_at=utcnow())
        session.add(deal)
        deals.append(deal)
    session.flush()
    why = None
    if len(chosen) < missing:
        detail = "; ".join(f"{p}: {r}" for p, r in sorted(reasons.items())) or "no providers are registered"
        why = f"{len(chosen)} of {missing} providers found ({detail})"
    return deals, why


def source_backend(name: str) -> Any:
    spec = get_settings().backends().get(name)
    if spec is None:
        raise UnknownBackend(f"backend {name!r} is not configured on this worker")
    backend = registry.get(spec)
    attach_locator(backend)
    return backend


def _commit(plan: Plan, outcomes: list[dict]) -> None:
    with transaction() as session:
        job_catalog.finish_items(session, plan.job_id, outcomes)
        job_catalog.finish_if_complete(session, plan.job_id)
    metrics.items_finished(plan, outcomes)


# -- proposing ---------------------------------------------------------------------------


def send_propose(backend: str, deal_ids: list[uuid.UUID]) -> None:
    app.send_task("ferry.deals.propose", args=[backend, [str(d) for d in deal_ids]], queue=queue_for(backend))


@app.task(name="ferry.deals.propose", bind=True, max_retries=None)
def propose(self, backend_name: str, deal_ids: list[str]) -> dict[str, int]:
    """Send each planned deal's proposal; refused ones are retried with another provider."""
    _, backend = filecoin_backend(backend_name)
    config = backend.config
    tally = {"proposed": 0, "rejected": 0, "failed": 0, "retried": 0}
    lotus, engine = backend.lotus(), backend.engine()
    follow_up: list[uuid.UUID] = []
    try:
        for deal_id in deal_ids:
            try:
                outcome = _propose_one(uuid.UUID(deal_id), backend_name, config, lotus, engine, follow_up)
            except BackendUnavailable as exc:
                countdown = backoff(self.request.retries)
                log.warning("proposing deal %s: %s; retrying in %.0fs", deal_id, exc.message, countdown)
                rest = deal_ids[deal_ids.index(deal_id):]
                raise self.retry(args=[backend_name, rest], countdown=countdown) from exc
            if outcome:
                tally[outcome] += 1
    finally:
        lotus.close()
        engine.close()
    if follow_up:
        tally["retried"] = len(follow_up)
        send_propose(backend_name, follow_up)
    return tally


def _propose_one(deal_id: uuid.UUID, backend: str, config: FilecoinConfig, lotus, engine,
                 follow_up: list[uuid.UUID]) -> str | None:
    with transaction() as session:
        deal = session.get(Deal, deal_id)
        if deal is None or deal.state != DealState.planned:
            return None  # proposed already (a message delivered twice), or cancelled
        piece = session.get(Piece, deal.piece_id)
        provider = session.get(Provider, deal.provider)
        pending = _reserved_datacap(session, deal) if deal.verified else 0
        piece_cid, padded, car_size, root = piece.piece_cid, piece.padded_size, piece.car_size, piece.root_cid
        price = None if provider is None else provider.verified_price if deal.verified else provider.price
    if price is None:
        _end(deal_id, DealState.failed, f"provider {deal.provider} is no longer registered", follow_up=follow_up,
             config=config)
        return "failed"
    if deal.verified:
        datacap = lotus.datacap(config.client)
        if datacap is None or datacap < padded + pending:
            have = "none (not a verified client)" if datacap is None else f"{datacap} bytes"
            error = DatacapShort(f"a verified deal of {padded} bytes needs datacap: client {config.client} has "
                                 f"{have}, {pending} bytes of it promised to deals in flight")
            _end(deal_id, DealState.failed, error.message)
            return "failed"
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    proposal = Proposal(
        provider=deal.provider, client=config.client, piece_cid=piece_cid, padded_size=padded, car_size=car_size,
        root_cid=root, url_template=f"{config.piece_url}/v1/pieces/{{PIECE_CID}}",
        headers={"Authorization": f"Bearer {token}"}, price_per_gib_epoch=price, verified=deal.verified,
        duration=deal.duration, start_delay=config.start_delay, keep_unsealed=config.keep_unsealed,
        ipni=config.ipni)
    # The token's hash is stored before the provider can fetch with it.
    with transaction() as session:
        row = session.get(Deal, deal_id, with_for_update=True)
        row.token_hash = catalog.token_hash(token)
    try:
        answer = engine.propose(proposal)
    except DealRejected as exc:
        _end(deal_id, DealState.rejected, exc.message, follow_up=follow_up, config=config)
        return "rejected"
    except BackendUnavailable:
        raise
    except FerryError as exc:
        _end(deal_id, DealState.failed, f"the deal tool refused the proposal: {exc.message}", follow_up=follow_up,
             config=config)
        return "failed"
    with transaction() as session:
        row = session.get(Deal, deal_id, with_for_update=True)
        row.proposal_id = answer.proposal_id
        row.start_epoch, row.end_epoch = answer.start_epoch, answer.end_epoch
        row.price_per_epoch = answer.price_per_epoch
        catalog.transition(row, DealState.proposed)
    log.info("deal %s: proposed to %s (piece %s, proposal %s)", deal_id, deal.provider, piece_cid,
             answer.proposal_id)
    return "proposed"


def _reserved_datacap(session, deal: Deal) -> int:
    """Datacap promised to this client's verified deals not yet on chain."""
    d, p = Deal.__table__.c, Piece.__table__.c
    q = (select(func.coalesce(func.sum(p.padded_size), 0)).select_from(Deal.__table__)
         .join(Piece.__table__, p.id == d.piece_id)
         .where(d.client == deal.client, d.verified.is_(True), d.id != deal.id,
                d.state == DealState.proposed.value))
    return int(session.execute(q).scalar_one())


def _end(deal_id: uuid.UUID, state: DealState, error: str, *, follow_up: list[uuid.UUID] | None = None,
         config: FilecoinConfig | None = None) -> None:
    """End a deal; a refused or failed one is retried with another provider while the
    copy has proposals left."""
    with transaction() as session:
        deal = session.get(Deal, deal_id, with_for_update=True)
        catalog.transition(deal, state, error)
        log.warning("deal %s with %s: %s: %s", deal_id, deal.provider, state.value, error)
        if follow_up is not None and config is not None:
            follow_up += [d.id for d in retry_deal(session, deal, config)]


def retry_deal(session, deal: Deal, config: FilecoinConfig, *, manual: bool = False) -> list[Deal]:
    """Plan the next attempt at the copy `deal` was, with a provider not yet tried for
    its piece; none once `max_attempts` proposals were made (unless `manual`)."""
    if not manual and deal.attempt >= config.max_attempts:
        deal.error = f"{deal.error or deal.state.value}; gave up after {deal.attempt} proposals for this copy"
        return []
    if deal.renewal_of is None and session.scalars(select(Deal.id).where(Deal.retry_of == deal.id)).first():
        return []  # already retried
    piece = session.get(Piece, deal.piece_id)
    terms = Terms(copies=1, verified=deal.verified, regions=None, spread_regions=False, max_price=None)
    planned, why = plan_copies(session, piece, deal.backend, config, terms, job_id=deal.job_id,
                               schedule=deal.schedule, retry_of=deal)
    if not planned:
        deal.error = f"{deal.error or deal.state.value}; no other provider to retry with ({why})"
    return planned


# -- tracking ------------------------------------------------------------------------------


@app.task(name="ferry.deals.track")
def track_all() -> int:
    """Beat: deal schedules that are due run; one tracking pass per filecoin backend, on
    that backend's queue."""
    run_schedules()
    names = [s.name for s in get_settings().backends().values() if s.driver == "filecoin"]
    for name in names:
        app.send_task("ferry.deals.track_backend", args=[name], queue=queue_for(name),
                      expires=get_settings().deal_track_seconds)
    return len(names)


@app.task(name="ferry.deals.track_backend", bind=True, max_retries=3)
def track_backend(self, backend_name: str) -> dict[str, int]:
    _, backend = filecoin_backend(backend_name)
    try:
        return track(backend)
    except BackendUnavailable as exc:
        log.warning("tracking deals of %s: %s", backend_name, exc.message)
        return {"error": 1}


def track(backend: FilecoinBackend) -> dict[str, int]:
    """One pass over the backend's deals in flight or live; returns changes by new state."""
    config = backend.config
    with transaction() as session:
        rows = session.execute(select(Deal.id, Deal.provider).where(
            Deal.backend == backend.name,
            Deal.state.in_([DealState.proposed, DealState.published, DealState.active, DealState.expiring]))).all()
    if not rows:
        return {}
    lotus, engine = backend.lotus(), backend.engine()
    changed: dict[str, int] = {}
    follow_up: list[uuid.UUID] = []
    touched: set[int] = set()
    try:
        head = lotus.head()
        client_id = lotus.lookup_id(config.client)
        tool = {d.proposal_id: d for d in engine.deals({p for _, p in rows})}
        for deal_id, _ in rows:
            with transaction() as session:
                deal = session.get(Deal, deal_id, with_for_update=True)
                before = deal.state
                _advance(deal, tool.get(deal.proposal_id), lotus, head, client_id, config)
                if deal.state != before:
                    changed[deal.state.value] = changed.get(deal.state.value, 0) + 1
                    touched.add(deal.piece_id)
                    if deal.state in (DealState.rejected, DealState.failed, DealState.slashed):
                        follow_up += [d.id for d in retry_deal(session, deal, config)]
                if deal.state == DealState.expiring and not session.scalars(
                        select(Deal.id).where(Deal.renewal_of == deal.id)).first():
                    piece = session.get(Piece, deal.piece_id)
                    terms = Terms(1, deal.verified, None, False, None)
                    renewals, why = plan_copies(session, piece, deal.backend, config, terms, renewal_of=deal,
                                                schedule=deal.schedule, job_id=deal.job_id)
                    follow_up += [d.id for d in renewals]
                    if not renewals:
                        deal.error = f"renewal not planned: {why}"
        with transaction() as session:
            catalog.sync_replicas(session, backend.name, touched)
    finally:
        lotus.close()
        engine.close()
    if follow_up:
        send_propose(backend.name, follow_up)
    return changed


ENGINE_ENDED = {"proposal_expired": DealState.failed, "rejected": DealState.rejected, "error": DealState.failed,
                "slashed": DealState.slashed, "expired": DealState.expired}


def _advance(deal: Deal, seen, lotus, head: int, client_id: str, config: FilecoinConfig) -> None:
    """Move one deal along what the deal tool and the chain say of it."""
    if deal.state == DealState.proposed:
        if seen is None:
            if deal.start_epoch is not None and head > deal.start_epoch:
                catalog.transition(deal, DealState.failed, "the deal tool no longer tracks the proposal and its "
                                                           "start epoch has passed")
            return
        if seen.state in ENGINE_ENDED and seen.chain_deal_id is None:
            reason = seen.error or seen.state.replace("_", " ")
            if seen.state == "proposal_expired":
                reason = "proposal expired: the provider did not publish it before its start epoch"
            catalog.transition(deal, ENGINE_ENDED[seen.state], reason)
            return
        if seen.chain_deal_id is None:
            return
        deal.chain_deal_id = int(seen.chain_deal_id)
    if deal.chain_deal_id is None:
        return
    chain = lotus.market_deal(deal.chain_deal_id)
    if chain is None:
        if deal.end_epoch is not None and head > deal.end_epoch:
            catalog.transition(deal, DealState.expired)
        elif deal.state in LIVE_DEAL_STATES:
            catalog.transition(deal, DealState.slashed, f"chain deal {deal.chain_deal_id} left the market before "
                                                        "its end epoch")
        elif deal.start_epoch is not None and head > deal.start_epoch:
            catalog.transition(deal, DealState.failed, f"chain deal {deal.chain_deal_id} was not activated by its "
                                                       "start epoch")
        return
    piece = object_session(deal).get(Piece, deal.piece_id)
    if (chain.piece_cid, chain.provider, chain.padded_size) != (piece.piece_cid, deal.provider, piece.padded_size) \
            or chain.client not in (client_id, config.client):
        catalog.transition(deal, DealState.failed,
                           f"chain deal {chain.deal_id} is not this proposal (piece {chain.piece_cid}, "
                           f"provider {chain.provider}, client {chain.client})")
        return
    deal.start_epoch, deal.end_epoch = chain.start_epoch, chain.end_epoch
    deal.price_per_epoch = chain.price_per_epoch
    if deal.state == DealState.proposed:
        catalog.transition(deal, DealState.published)
    if chain.slash_epoch >= 0:
        catalog.transition(deal, DealState.slashed, f"slashed at epoch {chain.slash_epoch}")
    elif head > chain.end_epoch:
        catalog.transition(deal, DealState.expired)
    elif chain.active:
        deal.sector_start_epoch = chain.sector_start_epoch
        renewing = head >= chain.end_epoch - config.renew_before
        catalog.transition(deal, DealState.expiring if renewing else DealState.active)


# -- quotes ------------------------------------------------------------------------------


def quote(source_backend: str, keys: list[str] | None, prefix: str | None, backend_name: str, terms: dict,
          duration: int | None) -> dict:
    """What deals of the selected objects would cost: the pieces they pack into, each
    eligible provider's price for them all, the `copies` cheapest-by-choice providers' total
    and the gas; nothing is proposed."""
    _, backend = filecoin_backend(backend_name)
    if source_backend not in get_settings().backends():
        raise UnknownBackend(f"unknown backend {source_backend!r}", field="source.backend")
    config = backend.config
    t = Terms.of({"deal": terms}, config)
    duration = duration or config.duration
    if (keys is None) == (prefix is None):
        raise InvalidRequest("give the source as either keys or a prefix", field="source")
    with transaction() as session:
        q = (select(StoredObject.cid, StoredObject.size).join(Replica, Replica.object_id == StoredObject.id)
             .where(Replica.backend == source_backend, Replica.state == ReplicaState.present)
             .order_by(Replica.key))
        q = q.where(Replica.key.in_(keys)) if keys is not None else q.where(under_prefix(Replica.key, prefix or ""))
        entries = [Entry(cid, size) for cid, size in session.execute(q)]
        groups, too_big = plan_pieces(entries, config.piece_size)
        padded = [padded_piece_size(sum(car_bound(e.size) + 41 for e in g) + 32) for g in groups]
        criteria = catalog.Criteria(padded_size=max(padded, default=config.piece_size), verified=t.verified,
                                    regions=t.regions, max_price=t.max_price)
        candidates, excluded = catalog.eligible(session, criteria)
    gib_epochs = sum(padded) * duration
    providers = [{"provider": c.provider.id, "region": c.provider.region, "price": c.price,
                  "cost": -(-c.price * gib_epochs // GiB), "reputation": c.reputation.score} for c in candidates]
    chosen = providers[:t.copies]
    storage = sum(p["cost"] for p in chosen)
    lotus = backend.lotus()
    try:
        gas = config.gas_per_deal * lotus.base_fee() * len(groups) * t.copies
    finally:
        lotus.close()
    total = storage + gas
    return {"objects": len(entries), "bytes": sum(e.size for e in entries), "pieces": len(groups),
            "padded_bytes": sum(padded), "copies": t.copies, "verified": t.verified, "duration": duration,
            "providers": providers, "storage_cost": storage, "gas_cost": gas, "total_cost": total,
            "total_fil": f"{total / 10**18:.18f}".rstrip("0").rstrip("."), "excluded": excluded,
            "too_big": len(too_big)}


# -- schedules -----------------------------------------------------------------------------


def schedule_counts(session, name: str) -> tuple[int, int, int]:
    """(pending, made, padded bytes made) of a schedule's deals; made leaves out the
    rejected and failed ones, which stored nothing."""
    d, p = Deal.__table__.c, Piece.__table__.c
    pending = session.execute(select(func.count()).select_from(Deal.__table__).where(
        d.schedule == name, d.state.in_([s.value for s in OPEN_DEAL_STATES]))).scalar_one()
    made, nbytes = session.execute(
        select(func.count(), func.coalesce(func.sum(p.padded_size), 0)).select_from(Deal.__table__)
        .join(Piece.__table__, p.id == d.piece_id)
        .where(d.schedule == name, d.state.not_in([DealState.rejected.value, DealState.failed.value]))).one()
    return int(pending), int(made), int(nbytes)


def run_schedules(now=None) -> dict[str, int]:
    """Run every schedule that is due and not paused: one deal job each, sized to the
    schedule's caps. Returns the deals each one asked for."""
    from policies.schema import Schedule

    now = now or utcnow()
    asked: dict[str, int] = {}
    with transaction() as session:
        due = list(session.scalars(select(DealSchedule).where(DealSchedule.paused.is_(False),
                                                              DealSchedule.next_run_at <= now)
                                   .with_for_update(skip_locked=True)))
        for row in due:
            try:
                asked[row.name] = _run_schedule(session, row)
                row.last_error = None
            except FerryError as exc:
                row.last_error = exc.message
                log.warning("deal schedule %s: %s", row.name, exc.message)
            row.last_run_at = now
            row.next_run_at = Schedule.model_validate(row.spec["schedule"]).next_run_after(now)
    return asked


def _run_schedule(session, row) -> int:
    """One run: the objects under the schedule's prefix not yet in enough deals, packed,
    as many pieces as the caps allow, submitted as a deal job."""
    spec = row.spec
    _, backend = filecoin_backend(spec["backend"])
    config = backend.config
    terms = Terms.of(spec, config)
    pending, made, made_bytes = schedule_counts(session, row.name)
    budget = spec["deals_per_run"]
    if spec.get("max_pending") is not None:
        budget = min(budget, spec["max_pending"] - pending)
    if spec.get("total_deals") is not None:
        budget = min(budget, spec["total_deals"] - made)
    pieces = budget // terms.copies
    if pieces <= 0:
        return 0
    source = spec["source"]
    o, r = StoredObject, Replica
    dealt = catalog.deal_copies_by_object  # objects already in enough open or live deals are left out
    in_flight = select(JobItem.object_id).where(JobItem.action == ItemAction.deal, JobItem.dest_backend ==
                                                spec["backend"], JobItem.state.in_(["queued", "running", "stuck"]))
    rows = session.execute(
        select(o.id, o.cid, o.size, r.key).join(r, r.object_id == o.id)
        .where(r.backend == source["backend"], r.state == ReplicaState.present,
               under_prefix(r.key, source.get("prefix") or ""), o.id.not_in(in_flight.scalar_subquery()))
        .order_by(r.key).limit(100_000)).all()
    have = dealt(session, [x.id for x in rows], spec["backend"], OPEN_DEAL_STATES | LIVE_DEAL_STATES)
    entries = [Entry(x.cid, x.size, ref=x.key) for x in rows if have.get(x.id, 0) < terms.copies]
    groups, _ = plan_pieces(entries, config.piece_size)
    keys: list[str] = []
    room = None if spec.get("total_bytes") is None else spec["total_bytes"] - made_bytes
    for group in groups[:pieces]:
        padded = padded_piece_size(sum(car_bound(e.size) + 41 for e in group) + 32) * terms.copies
        if room is not None:
            if padded > room:
                break
            room -= padded
        keys += [e.ref for e in group]
    if not keys:
        return 0
    job_spec = {"source": {"backend": source["backend"], "keys": len(keys)},
                "targets": [{"backend": spec["backend"], "prefix": ""}], "keep_source": False,
                "deal": spec.get("deal", {}), "schedule": row.name}
    request = job_tasks.JobRequest(kind=JobKind.deal, source_backend=source["backend"], keys=keys,
                                   targets=[job_tasks.Target(spec["backend"])], spec=job_spec)
    job_tasks.submit(request)  # its own transaction: the job stands even if this run's bookkeeping fails
    log.info("deal schedule %s: a deal job of %d objects (%d pieces x %d copies)", row.name, len(keys),
             min(pieces, len(groups)), terms.copies)
    return min(pieces, len(groups)) * terms.copies
