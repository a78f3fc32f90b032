"""Filecoin deals end to end: Ferry's API, worker and beat against the local simulation
of Singularity + Lotus + storage providers (tests/fixtures/filecoin_sim.py).

The simulated providers really fetch each piece from Ferry's piece server with the
per-deal token and check its CommP; the simulated chain publishes, activates, slashes
and expires deals; Ferry believes only the chain for `active`, and reads objects back
through the providers' trustless retrieval.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.cluster import FILECOIN_CLIENT as CLIENT
from tests.fixtures.cluster import auth, filecoin_cluster, wait_job

pytestmark = pytest.mark.e2e
KiB, MiB = 1024, 2**20


@pytest.fixture(scope="module")
def cluster(test_env, filecoin_sim, s3_backend):
    with filecoin_cluster(test_env, filecoin_sim, "deals") as c:
        yield c


@pytest.fixture(scope="module")
def api(cluster):
    with httpx.Client(base_url=cluster.api_url, timeout=60, headers=auth()) as client:
        yield client


@pytest.fixture
def market(filecoin_sim, api):
    """The sim reset: one verified client; providers registered both in the sim (how
    they behave) and in Ferry (their terms, as ops would enter them)."""
    sim = filecoin_sim
    sim.reset()
    # A reset chain has lost every deal: to Ferry that would be slashing, and retries of them
    # would take this test's providers. The deals of earlier tests are ended with the chain.
    from sqlalchemy import update

    from ferry.catalog.db import transaction
    from ferry.catalog.models import ENDED_DEAL_STATES, Deal
    with transaction() as session:
        session.execute(update(Deal).where(Deal.state.not_in([s.value for s in ENDED_DEAL_STATES]))
                        .values(state="expired", error="the simulated chain was reset between tests"))
    sim.clients([{"id": CLIENT, "address": "f1ferrytestclientaaaaaaaaaaaaaaaaaaaaaaaa", "datacap": 64 * MiB,
                  "balance": str(10 * 10**18), "escrow": "0", "locked": "0"}])

    def providers(*specs: dict) -> None:
        sim.providers([{k: v for k, v in s.items() if k not in ("region", "ferry_price", "access")} for s in specs])
        for s in specs:
            r = api.put("/v1/providers", json={
                "id": s["id"], "region": s.get("region"), "price": s.get("ferry_price", 0),
                "verified_price": s.get("ferry_price", 0), "retrieval_url": sim.retrieval_url(s["id"]),
                "access": s.get("access", "auto")})
            assert r.status_code == 200, r.text
        # Providers of earlier tests are denied, so only these are chosen now.
        for p in api.get("/v1/providers").json()["providers"]:
            if p["id"] not in {s["id"] for s in specs}:
                api.put("/v1/providers", json={"id": p["id"], "access": "deny"})

    sim.set_providers = providers
    return sim


def put_objects(api, disks: Path, prefix: str, sizes: list[int]) -> dict[str, bytes]:
    """Files on the `local` disk, catalogued (and verified) by a replicate job to `mirror`."""
    rng = random.Random(prefix)
    blobs = {}
    for i, n in enumerate(sizes):
        data = rng.randbytes(n)
        path = disks / "local" / prefix / f"f{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        blobs[f"{prefix}/f{i}.bin"] = data
    r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "local", "prefix": f"{prefix}/"},
                                   "targets": [{"backend": "mirror", "prefix": f"{prefix}/"}]})
    assert r.status_code == 202, r.text
    assert wait_job(api, r.json()["id"], timeout=120)["state"] == "succeeded"
    return blobs


def wait_deals(api, job_id: str, want: dict[str, int], timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        deals = api.get("/v1/deals", params={"job_id": job_id}).json()["deals"]
        states: dict[str, int] = {}
        for d in deals:
            states[d["state"]] = states.get(d["state"], 0) + 1
        if all(states.get(s, 0) >= n for s, n in want.items()):
            return deals
        if time.monotonic() > deadline:
            raise AssertionError(f"deals of job {job_id} did not reach {want}: {states}: "
                                 f"{[(d['provider'], d['state'], d['error']) for d in deals]}")
        time.sleep(0.3)


def test_deals_are_made_tracked_on_chain_and_read_back(api, market, disks):
    market.set_providers(
        {"id": "f01002", "behaviour": "reject", "ferry_price": 10, "region": "eu"},     # cheapest: chosen, refuses
        {"id": "f01001", "behaviour": "accept", "ferry_price": 20, "region": "us"},
        {"id": "f01000", "behaviour": "accept", "ferry_price": 30, "region": "eu", "fetch_ranges": True},
    )
    blobs = put_objects(api, disks, "dealset", [100 * KiB, 300 * KiB, 5, 400 * KiB, 262144])

    # A quote first: nothing is proposed by it.
    q = api.post("/v1/deals/quote", json={"source": {"backend": "local", "prefix": "dealset/"},
                                          "backend": "filecoin", "deal": {"copies": 2}})
    assert q.status_code == 200, q.text
    quote = q.json()
    assert quote["objects"] == 5 and quote["pieces"] == 2 and quote["copies"] == 2
    assert [p["provider"] for p in quote["providers"]][:2] == ["f01002", "f01001"]  # same reputation: by price
    assert quote["providers"][0]["cost"] == -(-10 * quote["padded_bytes"] * quote["duration"] // 2**30)
    assert quote["total_cost"] == quote["storage_cost"] + quote["gas_cost"] and quote["gas_cost"] > 0
    assert market.deals() == []

    r = api.post("/v1/jobs", json={"kind": "deal", "source": {"backend": "local", "prefix": "dealset/"},
                                   "targets": [{"backend": "filecoin"}], "deal": {"copies": 2}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert wait_job(api, job_id, timeout=120)["state"] == "succeeded"
    # Each piece: f01002 refuses (synchronously), the retry goes to f01000; f01001 takes it.
    deals = wait_deals(api, job_id, {"active": 4, "rejected": 2})
    by_piece: dict[str, list[dict]] = {}
    for d in deals:
        by_piece.setdefault(d["piece_cid"], []).append(d)
    assert len(by_piece) == 2
    for piece, ds in by_piece.items():
        active = sorted(d["provider"] for d in ds if d["state"] == "active")
        assert active == ["f01000", "f01001"], ds
        rejected = [d for d in ds if d["state"] == "rejected"]
        assert [d["provider"] for d in rejected] == ["f01002"] and "rejected" in rejected[0]["error"]
        retry = [d for d in ds if d["retry_of"] == rejected[0]["id"]]
        assert len(retry) == 1 and retry[0]["provider"] == "f01000" and retry[0]["attempt"] == 2
        for d in ds:
            if d["state"] == "active":
                assert d["chain_deal_id"] and d["sector_start_epoch"] > 0 and d["verified"]
                assert market.deal(d["proposal_id"])["pieceCid"] == piece
    # The providers fetched each piece with its deal's token (one in two ranges).
    fetches = market.fetches()
    assert fetches and all(f["authorization"] for f in fetches), fetches
    assert all(f["status"] in (200, 206) for f in fetches), fetches

    # Every object is a replica on Filecoin now: present, keyed by its CID.
    from workers.cid import digest_bytes
    for data in blobs.values():
        cid = digest_bytes(data).cid
        obj = api.get(f"/v1/objects/{cid}").json()
        fil = [rep for rep in obj["replicas"] if rep["backend"] == "filecoin"]
        assert fil and fil[0]["state"] == "present" and fil[0]["key"] == cid, obj
        listed = api.get("/v1/deals", params={"cid": cid}).json()["deals"]
        assert sum(d["state"] == "active" for d in listed) == 2

    # Read back out of Filecoin through the providers' trustless retrieval, verified.
    cids = [digest_bytes(d).cid for d in blobs.values()]
    r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "filecoin", "keys": cids},
                                   "targets": [{"backend": "archive", "prefix": "from-filecoin/"}]})
    assert r.status_code == 202, r.text
    assert wait_job(api, r.json()["id"], timeout=120)["state"] == "succeeded"
    for data in blobs.values():
        cid = digest_bytes(data).cid
        assert (disks / "archive" / "from-filecoin" / cid).read_bytes() == data

    # The piece server: no token, another's token, an unknown piece.
    piece = next(iter(by_piece))
    assert api.get(f"/v1/pieces/{piece}", headers={"Authorization": ""}).status_code == 401
    assert httpx.get(f"{api.base_url}/v1/pieces/{piece}",
                     headers={"Authorization": "Bearer fyd_not-a-real-token"}).status_code == 401
    # Active deals no longer open their piece to fetches.
    assert httpx.get(f"{api.base_url}/v1/pieces/{piece}").status_code == 401

    # Ferry's own record makes the reputation: f01002 refused both proposals.
    provs = {p["id"]: p for p in api.get("/v1/providers").json()["providers"]}
    assert provs["f01002"]["reputation"]["rejected"] == 2
    assert provs["f01002"]["reputation"]["score"] < provs["f01000"]["reputation"]["score"]


def test_slashed_deals_are_replaced_and_deals_are_renewed_before_they_end(api, market, disks):
    market.set_providers(
        {"id": "f02000", "behaviour": "slash", "slash_after_epochs": 3, "ferry_price": 1},
        {"id": "f02001", "behaviour": "accept", "ferry_price": 2},
    )
    put_objects(api, disks, "slashset", [200 * KiB])
    r = api.post("/v1/jobs", json={"kind": "deal", "source": {"backend": "local", "prefix": "slashset/"},
                                   "targets": [{"backend": "filecoin"}], "deal": {"copies": 1}})
    job_id = r.json()["id"]
    assert wait_job(api, job_id, timeout=120)["state"] == "succeeded"
    deals = wait_deals(api, job_id, {"slashed": 1, "active": 1})
    slashed = next(d for d in deals if d["state"] == "slashed")
    replacement = next(d for d in deals if d["state"] == "active")
    assert slashed["provider"] == "f02000" and "slashed" in slashed["error"]
    assert replacement["provider"] == "f02001" and replacement["retry_of"] == slashed["id"]

    # Near the end: the active deal becomes expiring and gets one renewal, which activates.
    head = market.head()
    market.advance(replacement["end_epoch"] - 400 - head)
    deals = wait_deals(api, job_id, {"expiring": 1, "active": 1})
    renewal = next(d for d in deals if d["renewal_of"] == replacement["id"])
    # Never back to the provider that lost the piece: the renewal stays with f02001.
    assert renewal["state"] == "active" and renewal["provider"] == "f02001"
    market.advance(600)
    deals = wait_deals(api, job_id, {"expired": 1})
    assert next(d for d in deals if d["id"] == replacement["id"])["state"] == "expired"


def test_verified_deals_check_datacap_first(api, market, disks):
    market.set_providers({"id": "f03000", "behaviour": "accept", "ferry_price": 1})
    market.clients([{"id": CLIENT, "address": "f1ferrytestclientaaaaaaaaaaaaaaaaaaaaaaaa", "datacap": 1000,
                     "balance": "0", "escrow": "0", "locked": "0"}])
    put_objects(api, disks, "capset", [50 * KiB])
    r = api.post("/v1/jobs", json={"kind": "deal", "source": {"backend": "local", "prefix": "capset/"},
                                   "targets": [{"backend": "filecoin"}], "deal": {"copies": 1, "verified": True}})
    job_id = r.json()["id"]
    assert wait_job(api, job_id, timeout=120)["state"] == "succeeded"
    deals = wait_deals(api, job_id, {"failed": 1})
    assert "datacap" in deals[0]["error"] and "1000 bytes" in deals[0]["error"]
    assert market.deals() == []  # nothing was proposed


def test_deal_jobs_refuse_what_cannot_be_dealt(api):
    bad = [
        ({"kind": "deal", "source": {"backend": "local", "prefix": ""}, "targets": [{"backend": "archive"}]},
         "targets[0].backend"),
        ({"kind": "deal", "source": {"backend": "local", "prefix": ""},
          "targets": [{"backend": "filecoin", "prefix": "x/"}]}, "targets[0].prefix"),
        ({"kind": "replicate", "source": {"backend": "local", "prefix": ""}, "targets": [{"backend": "filecoin"}]},
         "targets[0].backend"),
        ({"kind": "replicate", "source": {"backend": "local", "prefix": ""}, "targets": [{"backend": "archive"}],
          "deal": {"copies": 2}}, "deal"),
    ]
    for body, field in bad:
        r = api.post("/v1/jobs", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["field"] == field
    assert api.put("/v1/providers", json={"id": "nope"}).status_code == 422
    assert api.get("/v1/deals/not-a-uuid").status_code == 404


def test_a_policy_keeps_filecoin_copies_and_heals_from_filecoin(api, market, disks):
    """`filecoin: {copies: 1}` makes the deals by itself; once the object's only verified
    copy is in an active deal, a lost local replica is healed from the provider."""
    market.set_providers({"id": "f04000", "behaviour": "accept", "ferry_price": 1},
                         {"id": "f04001", "behaviour": "accept", "ferry_price": 2})
    rng = random.Random(4)
    data = rng.randbytes(300 * KiB)
    path = disks / "local" / "healset" / "only.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    from workers.cid import digest_bytes
    cid = digest_bytes(data).cid
    # Catalogued, with a second copy on the archive disk.
    r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "local", "keys": ["healset/only.bin"]},
                                   "targets": [{"backend": "archive", "prefix": ""}]})
    assert wait_job(api, r.json()["id"])["state"] == "succeeded"

    bad = api.post("/v1/policies", json={"document": {"name": "fil-bad", "filecoin": {"copies": 1,
                                                                                      "backend": "archive"}}})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "filecoin.backend"
    r = api.post("/v1/policies", json={"document": {
        "name": "fil-heal", "selector": {"backend": "local", "prefix": "healset/"},
        "filecoin": {"copies": 1, "verified": False}, "schedule": "manual"}})
    assert r.status_code == 201, r.text
    assert api.post("/v1/policies/fil-heal/run").status_code in (200, 202)
    deadline = time.monotonic() + 60
    while True:
        deals = api.get("/v1/deals", params={"cid": cid}).json()["deals"]
        if any(d["state"] == "active" for d in deals):
            break
        assert time.monotonic() < deadline, deals
        time.sleep(0.3)
    assert len(deals) == 1 and not deals[0]["verified"] and deals[0]["provider"] == "f04000"

    # Both disk copies go bad: Filecoin holds the only verified copy, and heals them.
    copies = [path, disks / "archive" / "healset" / "only.bin"]
    for p in copies:
        p.write_bytes(b"corrupt" + data[7:])
    for backend in ("local", "archive"):
        r = api.post("/v1/jobs", json={"kind": "verify", "source": {"backend": backend, "keys": ["healset/only.bin"]}})
        assert wait_job(api, r.json()["id"])["state"] == "succeeded"
    deadline = time.monotonic() + 60
    while any(p.read_bytes() != data for p in copies):
        assert time.monotonic() < deadline, api.get(f"/v1/objects/{cid}").json()
        time.sleep(0.3)
    obj = api.get(f"/v1/objects/{cid}").json()
    states = {rep["backend"]: rep["state"] for rep in obj["replicas"]}
    assert states == {"local": "present", "archive": "present", "filecoin": "present"}, states
    # The passes since (after each verification) planned no more deals: the active one counts.
    assert len(api.get("/v1/deals", params={"cid": cid}).json()["deals"]) == 1
    api.delete("/v1/policies/fil-heal")


def _schedule_deals(api, name: str) -> list[dict]:
    return [d for d in api.get("/v1/deals", params={"limit": 1000}).json()["deals"] if d["schedule"] == name]


def test_a_deal_schedule_runs_within_its_caps_pauses_and_resumes(api, market, disks, cluster):
    market.set_providers({"id": "f05000", "behaviour": "ignore", "ferry_price": 1})  # never publishes
    put_objects(api, disks, "schedset", [600 * KiB] * 6)  # one object per 1 MiB piece
    body = {"name": "nightly", "source": {"backend": "local", "prefix": "schedset/"}, "backend": "filecoin",
            "deal": {"copies": 1, "verified": False}, "schedule": {"every": "1s"}, "deals_per_run": 2,
            "max_pending": 3, "total_deals": 5}
    assert api.put("/v1/deal-schedules", json={**body, "schedule": "manual"}).status_code == 422
    r = api.put("/v1/deal-schedules", json=body)
    assert r.status_code == 200, r.text
    # Two deals a run until three are pending: then the runs wait.
    deadline = time.monotonic() + 30
    while len(_schedule_deals(api, "nightly")) < 3:
        assert time.monotonic() < deadline, _schedule_deals(api, "nightly")
        time.sleep(0.3)
    time.sleep(3)  # several more runs: none may pass the pending cap
    deals = _schedule_deals(api, "nightly")
    assert len(deals) == 3 and {d["state"] for d in deals} == {"proposed"}, deals
    s = api.get("/v1/deal-schedules/nightly").json()
    assert (s["pending"], s["made"], s["last_error"]) == (3, 3, None)

    # Paused, it makes nothing, even once the proposals expire and free the pending cap.
    env = {**os.environ, "FERRY_API_URL": cluster.api_url, "COLUMNS": "200"}
    ferry = str(Path(sys.executable).parent / "ferry")
    r = subprocess.run([ferry, "deal", "schedule", "pause", "nightly"], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    market.advance(400)
    deadline = time.monotonic() + 30
    while any(d["state"] == "proposed" for d in _schedule_deals(api, "nightly")):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    deals = _schedule_deals(api, "nightly")
    assert len(deals) == 3 and {d["state"] for d in deals} == {"failed"}
    assert all("proposal expired" in d["error"] for d in deals), deals

    # Resumed with a provider that works: runs go on until five deals stand (the failed ones
    # do not count), never a sixth.
    market.set_providers({"id": "f05001", "behaviour": "accept", "ferry_price": 1})
    r = subprocess.run([ferry, "deal", "schedule", "resume", "nightly"], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 60
    while sum(d["state"] == "active" for d in _schedule_deals(api, "nightly")) < 5:
        assert time.monotonic() < deadline, _schedule_deals(api, "nightly")
        time.sleep(0.3)
    time.sleep(3)
    deals = _schedule_deals(api, "nightly")
    assert sum(d["state"] == "active" for d in deals) == 5 and len(deals) == 8
    r = subprocess.run([ferry, "deal", "schedule", "list"], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "nightly" in r.stdout, r.stderr
    r = subprocess.run([ferry, "deal", "list", "--state", "active"], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "f05001" in r.stdout
    assert api.delete("/v1/deal-schedules/nightly").status_code == 200


def test_refusals_are_retried_up_to_the_limit_and_slow_activation_is_waited_for(api, market, disks, cluster):
    # Four providers refuse; the copy is proposed max_attempts (3) times, then given up.
    market.set_providers(*({"id": f"f0600{i}", "behaviour": "reject", "ferry_price": 1 + i} for i in range(4)),
                         {"id": "f06009", "behaviour": "accept", "ferry_price": 100, "access": "deny"})
    put_objects(api, disks, "refused", [100 * KiB])
    r = api.post("/v1/jobs", json={"kind": "deal", "source": {"backend": "local", "prefix": "refused/"},
                                   "targets": [{"backend": "filecoin"}], "deal": {"copies": 1}})
    job_id = r.json()["id"]
    assert wait_job(api, job_id, timeout=60)["state"] == "succeeded"
    deadline = time.monotonic() + 30
    while True:
        deals = api.get("/v1/deals", params={"job_id": job_id}).json()["deals"]
        if len(deals) == 3 and all(d["state"] == "rejected" for d in deals) and \
                any("gave up after 3" in (d["error"] or "") for d in deals):
            break
        assert time.monotonic() < deadline, [(d["provider"], d["state"], d["error"]) for d in deals]
        time.sleep(0.3)
    time.sleep(1.5)  # and no fourth proposal follows; the denied provider is never asked
    deals = api.get("/v1/deals", params={"job_id": job_id}).json()["deals"]
    assert sorted(d["provider"] for d in deals) == ["f06000", "f06001", "f06002"]
    assert sorted(d["attempt"] for d in deals) == [1, 2, 3]

    # The CLI retries the given-up copy by hand, with the one provider left untried; it is slow
    # to seal: published (on chain, no sector yet) for a while, active only once sealed.
    api.put("/v1/providers", json={"id": "f06003", "access": "deny"})
    api.put("/v1/providers", json={"id": "f06009", "price": 100, "verified_price": 100, "access": "auto",
                                   "retrieval_url": market.retrieval_url("f06009")})
    market.providers([{"id": "f06009", "behaviour": "accept", "activation_epochs": 40}])
    env = {**os.environ, "FERRY_API_URL": cluster.api_url, "COLUMNS": "200"}
    ferry = str(Path(sys.executable).parent / "ferry")
    last = next(d for d in deals if d["attempt"] == 3)
    r = subprocess.run([ferry, "deal", "retry", last["id"]], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    seen = set()
    while True:
        deals = api.get("/v1/deals", params={"provider": "f06009"}).json()["deals"]
        seen |= {d["state"] for d in deals}
        if deals and deals[0]["state"] == "active":
            break
        assert time.monotonic() < deadline, deals
        time.sleep(0.2)
    assert "published" in seen, seen  # tracked on chain before its sector was proven
    assert deals[0]["retry_of"] == last["id"] and deals[0]["attempt"] == 4
    r = subprocess.run([ferry, "deal", "show", deals[0]["id"]], env=env, capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0 and "active" in r.stdout and deals[0]["piece_cid"] in r.stdout, r.stdout
    r = subprocess.run([ferry, "deal", "show", last["id"]], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "rejected" in r.stdout  # an ended, refused deal
    r = subprocess.run([ferry, "deal", "retry", deals[0]["id"]], env=env, capture_output=True, text=True,
                       check=False)
    assert r.returncode == 2 and "only a rejected, failed, slashed or expired deal" in r.stderr
    r = subprocess.run([ferry, "deal", "quote", "local:refused/", "--copies", "1", "--json"], env=env,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and '"pieces": 1' in r.stdout, r.stderr
    r = subprocess.run([ferry, "deal", "make", "local:refused/", "--to", "local"], env=env, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 2 and "deals are made by a filecoin backend" in r.stderr, r.stderr
