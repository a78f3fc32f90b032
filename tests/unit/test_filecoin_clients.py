"""Ferry's Lotus JSON-RPC and Singularity REST clients against the simulation's APIs:
answers parsed as documented, every failure typed."""

from __future__ import annotations

import pytest

from ferry.errors import BackendError, BackendUnavailable
from workers.commp import piece_of_bytes
from workers.filecoin import (
    DealRejected,
    LotusClient,
    Proposal,
    RpcError,
    SingularityEngine,
)

CLIENT = "f01234"


def proposal(provider: str, piece_cid: str, **kw) -> Proposal:
    return Proposal(provider=provider, client=CLIENT, piece_cid=piece_cid, padded_size=kw.pop("padded", 256),
                    car_size=100, root_cid="bafkqaaa", url_template="http://127.0.0.1:9/{PIECE_CID}",
                    headers={"Authorization": "Bearer fyd_x"}, price_per_gib_epoch=kw.pop("price", 10**9),
                    verified=kw.pop("verified", False), duration=3000, start_delay=300)


def test_chain_reads(fil):
    lotus = LotusClient(fil.lotus_url)
    try:
        assert lotus.head() == fil.head()
        assert lotus.base_fee() == 100
        assert lotus.datacap(CLIENT) == 64 * 2**30
        assert lotus.datacap("f099999") is None
        assert lotus.balance(CLIENT) == 10 * 10**18
        assert lotus.market_balance(CLIENT) == (0, 0)
        assert lotus.lookup_id("f1ferrytestclientaaaaaaaaaaaaaaaaaaaaaaaa") == CLIENT
        assert lotus.market_deal(123456789) is None  # "not found" is an answer, not an error
        with pytest.raises(RpcError, match="not found"):
            lotus.lookup_id("f1nobody")
    finally:
        lotus.close()


def test_lotus_token_and_unreachable(fil):
    fil.set_lotus_token("s3cret")
    try:
        for token, error in ((None, "check lotus_token"), ("wrong", "check lotus_token")):
            lotus = LotusClient(fil.lotus_url, token)
            with pytest.raises(BackendError, match=error):
                lotus.head()
            lotus.close()
        lotus = LotusClient(fil.lotus_url, "s3cret")
        assert lotus.head() > 0
        lotus.close()
    finally:
        fil.set_lotus_token(None)
    lotus = LotusClient("http://127.0.0.1:9/rpc/v1", timeout=2)
    with pytest.raises(BackendUnavailable, match="cannot be reached"):
        lotus.head()
    lotus.close()


def test_singularity_proposals(fil):
    engine = SingularityEngine(fil.singularity_url)
    piece = piece_of_bytes(b"x" * 100).cid
    try:
        engine.check(CLIENT)
        with pytest.raises(BackendError, match="no wallet"):
            engine.check("f0777")
        with pytest.raises(DealRejected, match="deal rejected by f01002"):
            engine.propose(proposal("f01002", piece))  # the sim's refusing provider
        with pytest.raises(DealRejected, match="below the"):
            engine.propose(proposal("f01000", piece, price=1))
        with pytest.raises(BackendError, match="piece CID must be commp"):
            engine.propose(proposal("f01000", "bafkqaaa"))
        deal = engine.propose(proposal("f01000", piece))
        assert deal.state == "proposed" and deal.chain_deal_id is None and deal.start_epoch > fil.head()
        assert deal.end_epoch == deal.start_epoch + 3000
        listed = {d.proposal_id: d for d in engine.deals(["f01000"])}
        assert listed[deal.proposal_id].piece_cid == piece
    finally:
        engine.close()
    engine = SingularityEngine("http://127.0.0.1:9/api", timeout=2)
    with pytest.raises(BackendUnavailable):
        engine.deals(["f01000"])
    engine.close()
