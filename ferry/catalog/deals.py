"""Catalog queries of Filecoin deal-making: providers and their reputation, provider
selection, deals and their state changes, and the replicas active deals stand for."""

from __future__ import annotations

import hashlib
import statistics
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ferry.catalog.models import (
    ENDED_DEAL_STATES,
    LIVE_DEAL_STATES,
    OPEN_DEAL_STATES,
    Deal,
    DealState,
    Piece,
    PieceObject,
    Provider,
    ProviderAccess,
    Replica,
    ReplicaState,
    StoredObject,
    utcnow,
)
from ferry.catalog.replicas import ReplicaFact, record
from ferry.errors import NotFound


class DealNotFound(NotFound):
    """Raised when no deal has the given id."""

    code = "deal_not_found"


class ProviderNotFound(NotFound):
    """Raised when no storage provider has the given id."""

    code = "provider_not_found"


@dataclass(frozen=True, slots=True)
class Reputation:
    """A provider's record with Ferry's own deals, and the score it ranks by.

    score = acceptance x activation x (1 - slash rate) x speed, where acceptance is
    (accepted + 1) / (proposed + 2), activation (activated + 1) / (accepted and settled + 2)
    (settled: activated or failed after acceptance), and speed 1 / (1 + median hours from
    proposal to activation / 24). A provider Ferry has never used scores 0.5 x 0.5 = 0.25:
    below one that proved itself, above one that keeps refusing.
    """

    proposed: int = 0
    rejected: int = 0
    activated: int = 0
    failed: int = 0
    slashed: int = 0
    median_activation_hours: float | None = None

    @property
    def score(self) -> float:
        accepted = self.proposed - self.rejected
        acceptance = (accepted + 1) / (self.proposed + 2)
        activation = (self.activated + 1) / (self.activated + self.failed + 2)
        slash_rate = self.slashed / self.activated if self.activated else 0.0
        speed = 1.0 if self.median_activation_hours is None else 1 / (1 + self.median_activation_hours / 24)
        return round(acceptance * activation * (1 - min(slash_rate, 1.0)) * speed, 4)

    def as_dict(self) -> dict:
        return {"proposed": self.proposed, "rejected": self.rejected, "activated": self.activated,
                "failed": self.failed, "slashed": self.slashed,
                "median_activation_hours": self.median_activation_hours, "score": self.score}


def reputations(session: Session, providers: Iterable[str] | None = None) -> dict[str, Reputation]:
    """Each provider's reputation from the deals Ferry made with it."""
    d = Deal.__table__.c
    q = (select(d.provider, d.state, d.activated_at.is_not(None), func.count())
         .where(d.state != DealState.planned.value).group_by(d.provider, d.state, d.activated_at.is_not(None)))
    wanted = set(providers) if providers is not None else None
    if wanted is not None:
        q = q.where(d.provider.in_(wanted))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for provider, state, was_active, n in session.execute(q):
        c = counts[provider]
        c["proposed"] += n
        state = DealState(state)
        if state == DealState.rejected:
            c["rejected"] += n
        if was_active:
            c["activated"] += n
        if state == DealState.failed and not was_active:
            c["failed"] += n
        if state == DealState.slashed:
            c["slashed"] += n
    hours: dict[str, list[float]] = defaultdict(list)
    q = select(d.provider, d.proposed_at, d.activated_at).where(d.activated_at.is_not(None), d.proposed_at.is_not(None))
    if wanted is not None:
        q = q.where(d.provider.in_(wanted))
    for provider, proposed_at, activated_at in session.execute(q):
        hours[provider].append((activated_at - proposed_at).total_seconds() / 3600)
    out = {}
    for provider, c in counts.items():
        median = statistics.median(hours[provider]) if hours[provider] else None
        out[provider] = Reputation(c["proposed"], c["rejected"], c["activated"], c["failed"], c["slashed"],
                                   None if median is None else round(median, 3))
    return out


@dataclass
class Criteria:
    """What a deal's provider must offer."""

    padded_size: int
    verified: bool
    regions: Sequence[str] | None = None
    max_price: int | None = None        # attoFIL per GiB per epoch
    spread_regions: bool = False
    exclude: set[str] = field(default_factory=set)
    avoid_regions: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Candidate:
    provider: Provider
    price: int
    reputation: Reputation


def eligible(session: Session, criteria: Criteria) -> tuple[list[Candidate], dict[str, str]]:
    """Providers that may take such a deal, best first (allowed ones, then by reputation,
    then by price), and why each of the others may not."""
    reasons: dict[str, str] = {}
    providers = list(session.scalars(select(Provider).order_by(Provider.id)))
    reps = reputations(session, [p.id for p in providers])
    out = []
    for p in providers:
        price = p.verified_price if criteria.verified else p.price
        why = None
        if p.access == ProviderAccess.deny:
            why = "denied"
        elif p.id in criteria.exclude:
            why = "already has or had this piece"
        elif criteria.verified and not p.verified:
            why = "takes no verified deals"
        elif not p.min_piece_size <= criteria.padded_size <= p.max_piece_size:
            why = f"takes pieces of {p.min_piece_size} to {p.max_piece_size} bytes"
        elif criteria.max_price is not None and price > criteria.max_price:
            why = f"price {price} above the cap {criteria.max_price}"
        elif criteria.regions and p.region not in criteria.regions:
            why = f"region {p.region!r} not in {criteria.regions}"
        if why:
            reasons[p.id] = why
        else:
            out.append(Candidate(p, price, reps.get(p.id, Reputation())))
    out.sort(key=lambda c: (c.provider.access != ProviderAccess.allow, -c.reputation.score, c.price, c.provider.id))
    return out, reasons


def choose(session: Session, criteria: Criteria, count: int) -> tuple[list[Candidate], dict[str, str]]:
    """Up to `count` distinct providers for copies of one piece (distinct regions too
    when `spread_regions`), best first; with the reasons for the rest."""
    candidates, reasons = eligible(session, criteria)
    chosen: list[Candidate] = []
    regions = set(criteria.avoid_regions)
    for c in candidates:
        if len(chosen) == count:
            break
        if criteria.spread_regions and c.provider.region in regions:
            reasons[c.provider.id] = f"region {c.provider.region!r} already holds a copy"
            continue
        chosen.append(c)
        regions.add(c.provider.region)
    return chosen, reasons


def get_deal(session: Session, deal_id: str | uuid.UUID, lock: bool = False) -> Deal:
    try:
        did = deal_id if isinstance(deal_id, uuid.UUID) else uuid.UUID(str(deal_id))
    except ValueError:
        raise DealNotFound(f"no deal {deal_id!r}") from None
    deal = session.get(Deal, did, with_for_update=lock)
    if deal is None:
        raise DealNotFound(f"no deal {deal_id}")
    return deal


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def transition(deal: Deal, state: DealState, error: str | None = None) -> bool:
    """Move a deal to `state` (with its timestamps); False when it already was there."""
    if deal.state == state and (error is None or deal.error == error):
        return False
    now = utcnow()
    deal.state = state
    deal.updated_at = now
    if error is not None:
        deal.error = error
    if state == DealState.proposed and deal.proposed_at is None:
        deal.proposed_at = now
    elif state == DealState.published and deal.published_at is None:
        deal.published_at = now
    elif state in LIVE_DEAL_STATES and deal.activated_at is None:
        deal.activated_at = now
    if state in ENDED_DEAL_STATES and deal.ended_at is None:
        deal.ended_at = now
        deal.token_hash = None  # the piece URL it was given stops working
    return True


def piece_providers(session: Session, piece_id: int) -> tuple[set[str], set[str], set[str]]:
    """(providers holding or about to hold the piece, every provider ever tried with it, those
    whose deal for it was refused, failed or slashed)."""
    d = Deal.__table__.c
    holding, tried, let_down = set(), set(), set()
    for provider, state in session.execute(select(d.provider, d.state).where(d.piece_id == piece_id)):
        state = DealState(state)
        tried.add(provider)
        if state in OPEN_DEAL_STATES | LIVE_DEAL_STATES:
            holding.add(provider)
        elif state in (DealState.rejected, DealState.failed, DealState.slashed):
            let_down.add(provider)
    return holding, tried, let_down


def copies_of_pieces(session: Session, piece_ids: Sequence[int]) -> dict[int, int]:
    """Open or live deals per piece: the copies it has or will have."""
    d = Deal.__table__.c
    states = [s.value for s in OPEN_DEAL_STATES | LIVE_DEAL_STATES]
    rows = session.execute(select(d.piece_id, func.count()).where(d.piece_id.in_(piece_ids), d.state.in_(states))
                           .group_by(d.piece_id)) if piece_ids else ()
    return dict(rows)


def deal_copies_by_object(session: Session, object_ids: Sequence[int], backend: str,
                          states: Iterable[DealState]) -> dict[int, int]:
    """Deals on `backend` in `states` holding each object (through any of its pieces)."""
    if not object_ids:
        return {}
    d, po = Deal.__table__.c, PieceObject.__table__.c
    q = (select(po.object_id, func.count(d.id)).join(Deal.__table__, d.piece_id == po.piece_id)
         .where(po.object_id.in_(object_ids), d.backend == backend, d.state.in_([s.value for s in states]))
         .group_by(po.object_id))
    return dict(session.execute(q).all())


def sync_replicas(session: Session, backend: str, piece_ids: Iterable[int]) -> None:
    """The objects of these pieces are present on the filecoin `backend` (key: their CID,
    verified by the chain's proof) while some deal holding them is live, else gone."""
    piece_ids = list(set(piece_ids))
    if not piece_ids:
        return
    po, o = PieceObject.__table__.c, StoredObject.__table__.c
    objects = session.execute(select(o.id, o.cid, o.sha256, o.size).join(PieceObject.__table__, po.object_id == o.id)
                              .where(po.piece_id.in_(piece_ids)).distinct()).all()
    live = deal_copies_by_object(session, [r.id for r in objects], backend, LIVE_DEAL_STATES)
    facts = []
    for r in objects:
        if live.get(r.id):
            facts.append(ReplicaFact(backend, r.cid, ReplicaState.present, r.cid, r.sha256, r.size, verified=True))
    record(session, facts)
    gone = [r.cid for r in objects if not live.get(r.id)]
    if gone:
        for replica in session.scalars(select(Replica).where(Replica.backend == backend, Replica.key.in_(gone),
                                                             Replica.state != ReplicaState.gone)):
            replica.state = ReplicaState.gone
            replica.updated_at = utcnow()
            replica.last_error = "no live Filecoin deal holds it any more"


def retrieval_urls(session: Session, backend: str, cid: str) -> list[str]:
    """Retrieval endpoints of providers holding `cid` in a live deal on `backend`, best
    reputation first."""
    d, po, o, p = Deal.__table__.c, PieceObject.__table__.c, StoredObject.__table__.c, Provider.__table__.c
    rows = session.execute(
        select(p.id, p.retrieval_url).join(Deal.__table__, d.provider == p.id)
        .join(PieceObject.__table__, po.piece_id == d.piece_id).join(StoredObject.__table__, o.id == po.object_id)
        .where(o.cid == cid, d.backend == backend, d.state.in_([s.value for s in LIVE_DEAL_STATES]),
               p.retrieval_url.is_not(None)).distinct()).all()
    reps = reputations(session, [r.id for r in rows])
    rows.sort(key=lambda r: -reps.get(r.id, Reputation()).score)
    return [r.retrieval_url for r in rows]


def piece_of(session: Session, piece_cid: str) -> Piece | None:
    return session.scalars(select(Piece).where(Piece.piece_cid == piece_cid)).first()
