"""Provider reputation from Ferry's own deals, and the selection of providers for a
piece's copies (filters, ranking, spread), on the session's Postgres catalog."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from ferry.catalog import deals as catalog
from ferry.catalog.db import transaction
from ferry.catalog.models import Deal, DealState, Piece, Provider, ProviderAccess, utcnow

GiB = 2**30


def region() -> str:
    return f"unit-{uuid.uuid4().hex[:8]}"  # providers of this test only


def add(session, pid: str, where: str, **kw) -> Provider:
    p = Provider(id=pid, region=kw.pop("region", where), price=kw.pop("price", 10),
                 verified_price=kw.pop("verified_price", 0), min_piece_size=kw.pop("min_piece_size", 256),
                 max_piece_size=kw.pop("max_piece_size", 64 * GiB), verified=kw.pop("verified", True),
                 access=kw.pop("access", ProviderAccess.auto), created_at=utcnow(), updated_at=utcnow())
    session.merge(p)
    return p


def pid() -> str:
    return f"f09{uuid.uuid4().int % 10**9}"


def test_reputation_score():
    assert catalog.Reputation().score == 0.25  # never used: between proven and refusing
    proven = catalog.Reputation(proposed=10, activated=10, median_activation_hours=0.0)
    assert proven.score == round((11 / 12) ** 2, 4)
    slow = catalog.Reputation(proposed=10, activated=10, median_activation_hours=24.0)
    assert slow.score == round((11 / 12) ** 2 / 2, 4)
    refusing = catalog.Reputation(proposed=10, rejected=10)
    assert refusing.score < catalog.Reputation().score
    slashing = catalog.Reputation(proposed=4, activated=4, slashed=2, median_activation_hours=0.0)
    assert slashing.score == round((5 / 6) ** 2 * 0.5, 4)


def test_reputations_are_computed_from_deals():
    a, b = pid(), pid()
    with transaction() as session:
        add(session, a, "r")
        add(session, b, "r")
        piece = Piece(piece_cid=f"baga6ea4seaq{uuid.uuid4().hex}", padded_size=GiB, car_size=GiB - 1000,
                      root_cid="bafkqaaa", backend="filecoin")
        session.add(piece)
        session.flush()
        now = utcnow()

        def deal(provider, state, hours=None):
            d = Deal(id=uuid.uuid4(), piece_id=piece.id, backend="filecoin", provider=provider, client="f01234",
                     state=state, verified=False, duration=3000, attempt=1, created_at=now, updated_at=now,
                     proposed_at=now)
            if hours is not None:
                d.activated_at = now + timedelta(hours=hours)
            session.add(d)

        deal(a, DealState.active, 2)
        deal(a, DealState.active, 4)
        deal(a, DealState.slashed, 3)
        deal(a, DealState.planned)  # never proposed: not counted
        deal(b, DealState.rejected)
        deal(b, DealState.failed)
        session.flush()
        reps = catalog.reputations(session, [a, b])
    assert reps[a] == catalog.Reputation(proposed=3, rejected=0, activated=3, failed=0, slashed=1,
                                         median_activation_hours=3.0)
    assert reps[b] == catalog.Reputation(proposed=2, rejected=1, activated=0, failed=1, slashed=0)
    assert reps[a].score > reps[b].score


def test_choose_filters_ranks_and_spreads():
    where = region()
    other = region()
    ids = {name: pid() for name in ("cheap", "dear", "denied", "small", "unverified", "allowed", "elsewhere")}
    with transaction() as session:
        add(session, ids["cheap"], where, verified_price=1)
        add(session, ids["dear"], where, verified_price=50)
        add(session, ids["denied"], where, verified_price=0, access=ProviderAccess.deny)
        add(session, ids["small"], where, verified_price=0, max_piece_size=GiB // 2)
        add(session, ids["unverified"], where, verified_price=0, verified=False)
        add(session, ids["allowed"], where, verified_price=40, access=ProviderAccess.allow)
        add(session, ids["elsewhere"], other, verified_price=0)
        session.flush()
        criteria = catalog.Criteria(padded_size=GiB, verified=True, regions=[where])
        chosen, reasons = catalog.choose(session, criteria, 3)
        assert [c.provider.id for c in chosen] == [ids["allowed"], ids["cheap"], ids["dear"]]
        assert reasons[ids["denied"]] == "denied"
        assert "pieces of" in reasons[ids["small"]]
        assert reasons[ids["unverified"]] == "takes no verified deals"
        assert "region" in reasons[ids["elsewhere"]]
        # A price cap and an exclusion.
        criteria = catalog.Criteria(padded_size=GiB, verified=True, regions=[where], max_price=45,
                                    exclude={ids["cheap"]})
        chosen, reasons = catalog.choose(session, criteria, 3)
        assert [c.provider.id for c in chosen] == [ids["allowed"]]
        assert "above the cap" in reasons[ids["dear"]]
        assert reasons[ids["cheap"]] == "already has or had this piece"
        # Unverified deals are priced at `price`, and spread over regions when asked.
        criteria = catalog.Criteria(padded_size=GiB, verified=False, regions=[where, other], spread_regions=True)
        chosen, reasons = catalog.choose(session, criteria, 3)
        assert len({c.provider.region for c in chosen}) == len(chosen) == 2
        session.rollback()


@pytest.mark.parametrize("state,ended", [(DealState.rejected, True), (DealState.active, False),
                                         (DealState.proposed, False), (DealState.slashed, True)])
def test_transition_stamps_times_and_drops_the_token(state, ended):
    d = Deal(state=DealState.planned, token_hash="x" * 64)
    assert catalog.transition(d, state, "why")
    assert (d.ended_at is not None) == ended
    assert (d.token_hash is None) == ended
    assert not catalog.transition(d, state, "why")  # already there
