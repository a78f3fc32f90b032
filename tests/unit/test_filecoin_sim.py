"""The Filecoin simulation (tests/fixtures/filecoin_sim.py) speaks what Lotus, Singularity
and booster-http speak, and its providers behave as configured: these tests drive it over
HTTP only, with a small CAR server standing in for Ferry's side of an online deal."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from ferry.errors import ChecksumMismatch, KeyNotFound
from ferry.settings import BackendSpec
from tests.fixtures.filecoin_sim import FilecoinSim, SimError, bytes_of, epochs_of
from workers import registry
from workers.car import CarReader, write_car
from workers.cid import digest_bytes
from workers.commp import PieceHasher

CLIENT = "f01234"
CLIENT_ADDRESS = "f1ferrytestclientaaaaaaaaaaaaaaaaaaaaaaaa"
GiB = 1 << 30


@dataclass(frozen=True)
class Car:
    """A file, its root CID, its CAR and the CAR's piece."""

    payload: bytes
    root: str
    data: bytes
    piece_cid: str
    piece_size: int


def make_car(size: int = 700_000, seed: int = 1) -> Car:
    """Three 256 KiB raw leaves under a dag-pb root at the default size."""
    payload = random.Random(seed).randbytes(size)
    root = digest_bytes(payload).cid
    data = b"".join(write_car([payload], root))
    hasher = PieceHasher()
    hasher.update(data)
    piece = hasher.digest()
    return Car(payload, root, data, piece.cid, piece.padded_size)


@pytest.fixture(scope="module")
def car() -> Car:
    return make_car()


# -- Ferry's side of an online deal: serves CARs by piece CID ------------------------------

@dataclass
class CarServer:
    """Serves `files[piece_cid]` at /piece/{piece_cid}.car, with Range support; `status`
    forces every answer to that code; `requests` records (path, headers)."""

    files: dict[str, bytes] = field(default_factory=dict)
    status: int | None = None
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    url: str = ""
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def template(self) -> str:
        return f"{self.url}/piece/{{PIECE_CID}}.car"

    def start(self) -> CarServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _CarHandler)
        server.daemon_threads = True
        server.car_server = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


class _CarHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the provider gave up on the fetch: fine
            self.close_connection = True

    def do_GET(self) -> None:
        server: CarServer = self.server.car_server  # type: ignore[attr-defined]
        server.requests.append((self.path, dict(self.headers)))
        piece = self.path.removeprefix("/piece/").removesuffix(".car")
        data = server.files.get(piece)
        status = server.status or (200 if data is not None else 404)
        if status != 200:
            return self._send(status, b"no")
        first, last = 0, len(data) - 1
        if "Range" in self.headers:
            spec = self.headers["Range"].removeprefix("bytes=")
            a, b = spec.split("-")
            first, last, status = int(a), int(b) if b else len(data) - 1, 206
        self._send(status, data[first:last + 1],
                   {"Content-Range": f"bytes {first}-{last}/{len(data)}"} if status == 206 else {})

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def car_server(car: Car) -> Iterator[CarServer]:
    server = CarServer(files={car.piece_cid: car.data}).start()
    yield server
    server.close()


# -- helpers -------------------------------------------------------------------------------

def rpc(sim: FilecoinSim, method: str, *params: object, token: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = sim.http.post("/rpc/v1", json={"jsonrpc": "2.0", "id": 7, "method": method, "params": list(params)},
                             headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["jsonrpc"] == "2.0" and body["id"] == 7
    return body


def proposal(car: Car, server: CarServer, **overrides: object) -> dict:
    body = {
        "httpHeaders": [], "urlTemplate": server.template, "pricePerGbEpoch": 1e-10, "pricePerGb": 0,
        "pricePerDeal": 0, "rootCid": car.root, "verified": False, "ipni": True, "keepUnsealed": True,
        "startDelay": "200", "duration": "1000", "clientAddress": CLIENT, "providerId": "f01000",
        "pieceCid": car.piece_cid, "pieceSize": str(car.piece_size), "fileSize": len(car.data),
    }
    return body | overrides


def send_deal(sim: FilecoinSim, body: dict) -> httpx.Response:
    return sim.http.post("/api/send_deal", json=body)


def propose(sim: FilecoinSim, body: dict) -> dict:
    response = send_deal(sim, body)
    assert response.status_code == 200, response.text
    return response.json()


def gateway(sim: FilecoinSim, provider: str):
    return registry.build(BackendSpec(name="fil-retrieval", driver="gateway",
                                      settings={"gateways": [sim.retrieval_url(provider)], "timeout": 5}))


def store(sim: FilecoinSim, car: Car, tmp_path: Path, provider: str = "f01000", **kwargs: object) -> dict:
    path = tmp_path / f"{car.piece_cid}.car"
    path.write_bytes(car.data)
    return sim.store(provider, path, piece_cid=car.piece_cid, padded_size=car.piece_size, **kwargs)


# -- parsing -------------------------------------------------------------------------------

def test_durations_and_sizes_parse_as_singularity_does() -> None:
    assert epochs_of("72h") == 8640
    assert epochs_of("1h30m") == 180
    assert epochs_of("1500000") == 1_500_000
    assert bytes_of("32GiB") == 32 * GiB
    assert bytes_of("34359738368") == 32 * GiB
    assert bytes_of("32GB") == 32 * 10**9
    for bad in ("abc", "72x", ""):
        with pytest.raises(ValueError):
            epochs_of(bad)


# -- Lotus ---------------------------------------------------------------------------------

def test_chain_head_has_lotus_shape_and_advances(fil: FilecoinSim) -> None:
    head = rpc(fil, "Filecoin.ChainHead")["result"]
    assert head["Cids"][0]["/"].startswith("bafy2bzace")
    assert head["Blocks"][0]["Height"] == head["Height"] and head["Blocks"][0]["ParentBaseFee"] == "100"
    assert fil.advance(1000) >= head["Height"] + 1000
    assert rpc(fil, "Filecoin.ChainHead")["result"]["Height"] >= head["Height"] + 1000


def test_client_state_methods(fil: FilecoinSim) -> None:
    assert rpc(fil, "Filecoin.StateLookupID", CLIENT_ADDRESS, None)["result"] == CLIENT
    assert rpc(fil, "Filecoin.StateLookupID", "f01000", None)["result"] == "f01000"
    assert rpc(fil, "Filecoin.StateLookupID", "f1nobody", None)["error"]["code"] == 1
    assert rpc(fil, "Filecoin.StateVerifiedClientStatus", CLIENT, [])["result"] == str(64 * GiB)
    assert rpc(fil, "Filecoin.StateVerifiedClientStatus", "f1nobody", [])["result"] is None
    assert rpc(fil, "Filecoin.WalletBalance", CLIENT_ADDRESS)["result"] == str(10 * 10**18)
    assert rpc(fil, "Filecoin.StateMarketBalance", CLIENT, None)["result"] == {"Escrow": "0", "Locked": "0"}
    assert fil.deals() == []
    assert fil.http.get("/api/wallet").json() == [{"id": CLIENT, "address": CLIENT_ADDRESS}]


def test_rpc_errors(fil: FilecoinSim) -> None:
    assert rpc(fil, "Filecoin.Nope")["error"]["code"] == -32601
    assert rpc(fil, "Filecoin.StateMarketStorageDeal", 424242, None)["error"] == {
        "code": 1, "message": "failed to load deal 424242: deal 424242 not found"}
    assert rpc(fil, "Filecoin.StateMarketStorageDeal", "x", None)["error"]["code"] == -32602


def test_lotus_token_is_required_once_configured(fil: FilecoinSim) -> None:
    fil.set_lotus_token("s3cret")
    call = {"jsonrpc": "2.0", "id": 1, "method": "Filecoin.ChainHead", "params": []}
    assert fil.http.post("/rpc/v1", json=call).status_code == 401
    assert fil.http.post("/rpc/v1", json=call, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert "result" in rpc(fil, "Filecoin.ChainHead", token="s3cret")
    assert fil.head() > 0  # the /_sim endpoints need no token
    fil.reset()
    assert fil.http.post("/rpc/v1", json=call).status_code == 200


# -- Singularity: synchronous answers ------------------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    ({"clientAddress": "f09999"}, "client address not found"),
    ({"pieceCid": "bafkqaaa"}, "piece CID must be commp"),
    ({"pieceCid": "nonsense"}, "invalid piece CID"),
    ({"pieceSize": "3000"}, "piece size must be a power of 2"),
    ({"pieceSize": "32GB"}, "piece size must be a power of 2"),
    ({"pieceSize": "lots"}, "invalid piece size"),
    ({"duration": "forever"}, "invalid duration"),
    ({"startDelay": "3 days"}, "invalid start delay"),
    ({"rootCid": "not a cid"}, "invalid root CID"),
])
def test_send_deal_validation_is_400(fil: FilecoinSim, car: Car, car_server: CarServer, override: dict,
                                     message: str) -> None:
    response = send_deal(fil, proposal(car, car_server, **override))
    assert response.status_code == 400
    assert response.json() == {"err": message}
    assert fil.deals() == []


@pytest.mark.parametrize(("provider", "override", "reason"), [
    ("f01002", {}, "not accepting storage deals"),
    ("f01000", {"pricePerGbEpoch": 1e-11}, "below the unverified ask of 100000000"),
    ("f01009", {}, "provider not found"),
    ("f01003", {}, "outside the accepted range"),
    ("f01000", {"verified": True, "clientAddress": "f05555"}, "has 100 bytes of datacap"),
])
def test_provider_rejections_are_500(fil: FilecoinSim, car: Car, car_server: CarServer, provider: str,
                                     override: dict, reason: str) -> None:
    fil.providers([{"id": "f01003", "max_piece_size": car.piece_size // 2}])
    fil.clients([{"id": "f05555", "address": "f1small", "datacap": 100}])
    response = send_deal(fil, proposal(car, car_server, providerId=provider, **override))
    assert response.status_code == 500
    assert response.json()["err"].startswith(f"deal rejected by {provider}: ")
    assert reason in response.json()["err"]
    assert fil.deals() == []


def test_accepted_proposal_is_a_singularity_deal(fil: FilecoinSim, car: Car, car_server: CarServer) -> None:
    before = fil.head()
    deal = propose(fil, proposal(car, car_server, startDelay="72h", duration="2400h", pieceSize=str(car.piece_size)))
    after = fil.head()
    assert deal["state"] == "proposed" and deal["dealId"] is None and deal["scheduleId"] is None
    assert deal["clientId"] == CLIENT and deal["provider"] == "f01000" and deal["label"] == car.root
    assert deal["pieceCid"] == car.piece_cid and deal["pieceSize"] == car.piece_size
    assert before + 8640 <= deal["startEpoch"] <= after + 8640
    assert deal["endEpoch"] == deal["startEpoch"] + 288_000
    assert deal["sectorStartEpoch"] == -1 and deal["errorMessage"] == ""
    assert deal["price"] == str(10**8 * car.piece_size // GiB)
    assert len(deal["proposalId"]) == 36 and deal["createdAt"].endswith("Z")
    listed = fil.http.post("/api/deal", json={"providers": ["f01000"], "states": ["proposed"]}).json()
    assert listed == [deal | {"updatedAt": listed[0]["updatedAt"]}]
    assert fil.http.post("/api/deal", json={"providers": ["f01001"]}).json() == []
    assert fil.http.post("/api/deal", json={"states": ["active"]}).json() == []
    assert fil.http.post("/api/deal", json={"schedules": [1]}).json() == []


# -- provider lifecycle --------------------------------------------------------------------

def test_lifecycle_proposed_published_active_expired(fil: FilecoinSim, car: Car, car_server: CarServer) -> None:
    fil.providers([{"id": "f01010", "price": "100000000", "activation_epochs": 100}])
    headers = ["Authorization=Bearer ferry-token=x", "X-Ferry-Deal=1"]
    deal = propose(fil, proposal(car, car_server, providerId="f01010", httpHeaders=headers, startDelay="300"))
    assert rpc(fil, "Filecoin.StateMarketStorageDeal", 100_000, None)["error"]["code"] == 1  # not yet published
    published = fil.wait_state(deal["proposalId"], "published")
    assert published["dealId"] is not None and published["sectorStartEpoch"] == -1
    state = rpc(fil, "Filecoin.StateMarketStorageDeal", published["dealId"], None)["result"]["State"]
    assert state == {"SectorNumber": 0, "SectorStartEpoch": -1, "LastUpdatedEpoch": -1, "SlashEpoch": -1}
    fil.advance(100)
    active = fil.wait_state(deal["id"], "active")
    state = rpc(fil, "Filecoin.StateMarketStorageDeal", active["dealId"], [])["result"]
    assert state["Proposal"] == {
        "PieceCID": {"/": car.piece_cid}, "PieceSize": car.piece_size, "VerifiedDeal": False, "Client": CLIENT,
        "Provider": "f01010", "Label": car.root, "StartEpoch": deal["startEpoch"], "EndEpoch": deal["endEpoch"],
        "StoragePricePerEpoch": deal["price"], "ProviderCollateral": "0", "ClientCollateral": "0"}
    assert state["State"]["SectorStartEpoch"] == active["sectorStartEpoch"] > 0
    assert state["State"]["SlashEpoch"] == -1
    [fetch] = fil.fetches()
    assert fetch["headers"] == ["Authorization", "X-Ferry-Deal"] and fetch["authorization"]
    assert fetch["status"] == 200 and fetch["bytes"] == len(car.data) and fetch["ranges"] == []
    assert car_server.requests[0][0] == f"/piece/{car.piece_cid}.car"
    assert car_server.requests[0][1]["Authorization"] == "Bearer ferry-token=x"

    fil.advance(deal["endEpoch"] - fil.head() + 1)
    assert fil.deal(deal["id"])["state"] == "expired"
    assert rpc(fil, "Filecoin.StateMarketStorageDeal", active["dealId"], None)["error"]["code"] == 1


def test_ignored_proposal_expires(fil: FilecoinSim, car: Car, car_server: CarServer) -> None:
    fil.providers([{"id": "f01004", "behaviour": "ignore"}])
    deal = propose(fil, proposal(car, car_server, providerId="f01004", startDelay="200"))
    assert _wait_fetched(fil)["error"] == ""
    assert fil.deal(deal["id"])["state"] == "proposed" and fil.deal(deal["id"])["fetchedEpoch"] is not None
    fil.advance(210)
    assert fil.deal(deal["id"])["state"] == "proposal_expired"


def _wait_fetched(sim: FilecoinSim) -> dict:
    for _ in range(500):
        fetches = sim.fetches()
        if fetches and fetches[-1]["done"]:
            return fetches[-1]
        threading.Event().wait(0.01)
    raise AssertionError("the provider never finished its fetch")


def test_slashing(fil: FilecoinSim, car: Car, car_server: CarServer) -> None:
    fil.providers([{"id": "f01005", "behaviour": "slash", "slash_after_epochs": 5}])
    deal = fil.wait_state(propose(fil, proposal(car, car_server, providerId="f01005"))["id"], "active")
    fil.advance(5)
    slashed = fil.wait_state(deal["id"], "slashed")
    state = rpc(fil, "Filecoin.StateMarketStorageDeal", slashed["dealId"], None)["result"]["State"]
    assert state["SlashEpoch"] == deal["sectorStartEpoch"] + 5


@pytest.mark.parametrize(("case", "reason"), [
    ("bad_fetch", "commp mismatch"),
    ("wrong_piece", "commp mismatch: got "),
    ("forbidden", "fetch failed: HTTP 403"),
    ("short", "size mismatch"),
])
def test_fetch_failures_are_errors(fil: FilecoinSim, car: Car, car_server: CarServer, case: str,
                                   reason: str) -> None:
    fil.providers([{"id": "f01006", "behaviour": "bad_fetch"}])
    body = proposal(car, car_server)
    if case == "bad_fetch":
        body["providerId"] = "f01006"
    elif case == "wrong_piece":
        other = make_car(seed=2)
        assert other.piece_size == car.piece_size
        body["pieceCid"] = other.piece_cid
        car_server.files[other.piece_cid] = car.data
    elif case == "forbidden":
        car_server.status = 403
    else:
        body["fileSize"] = len(car.data) + 10
    deal = propose(fil, body)
    with pytest.raises(AssertionError, match="'error'"):
        fil.wait_state(deal["id"], "published")
    failed = fil.deal(deal["id"])
    assert failed["state"] == "error" and reason in failed["errorMessage"]
    if case == "wrong_piece":
        assert failed["errorMessage"] == f"commp mismatch: got {car.piece_cid}, proposal says {other.piece_cid}"
    assert failed["dealId"] is None


def test_fetch_in_two_ranges(fil: FilecoinSim, car: Car, car_server: CarServer) -> None:
    fil.providers([{"id": "f01007", "fetch_ranges": True}])
    deal = propose(fil, proposal(car, car_server, providerId="f01007"))
    fil.wait_state(deal["id"], "published")
    half = len(car.data) // 2
    [fetch] = fil.fetches()
    assert fetch["ranges"] == [f"bytes=0-{half - 1}", f"bytes={half}-"] and fetch["statuses"] == [206, 206]
    assert [r[1]["Range"] for r in car_server.requests] == fetch["ranges"]


def test_verified_deal_spends_datacap(fil: FilecoinSim, car: Car, car_server: CarServer) -> None:
    deal = propose(fil, proposal(car, car_server, verified=True, pricePerGbEpoch=0))
    assert rpc(fil, "Filecoin.StateVerifiedClientStatus", CLIENT, None)["result"] == str(64 * GiB)
    published = fil.wait_state(deal["id"], "published")
    assert published["verified"]
    assert rpc(fil, "Filecoin.StateVerifiedClientStatus", CLIENT_ADDRESS, None)["result"] == str(
        64 * GiB - car.piece_size)


def test_late_activation_is_an_error(fil: FilecoinSim, car: Car, car_server: CarServer) -> None:
    fil.providers([{"id": "f01008", "publish_epochs": 0, "activation_epochs": 500}])
    deal = propose(fil, proposal(car, car_server, providerId="f01008", startDelay="300"))
    published = fil.wait_state(deal["id"], "published")
    fil.advance(500)
    failed = fil.deal(deal["id"])
    assert failed["state"] == "error" and failed["errorMessage"] == "sector not activated before start epoch"
    assert rpc(fil, "Filecoin.StateMarketStorageDeal", published["dealId"], None)["error"]["code"] == 1


# -- retrieval -----------------------------------------------------------------------------

def test_gateway_driver_reads_an_active_deal(fil: FilecoinSim, car: Car, car_server: CarServer) -> None:
    deal = propose(fil, proposal(car, car_server))
    backend = gateway(fil, "f01000")
    with pytest.raises(KeyNotFound):
        backend.read(car.root)
    base = f"/retrieval/f01000/ipfs/{car.root}"
    assert fil.http.get(base, params={"format": "raw"}).status_code == 404
    fil.wait_state(deal["id"], "active")
    assert b"".join(backend.read(car.root)) == car.payload
    assert backend.stat(car.root).size == len(car.payload)
    backend.check()
    response = fil.http.get(base, params={"format": "car", "dag-scope": "all"})
    assert response.headers["content-type"] == "application/vnd.ipld.car; version=1; order=dfs; dups=y"
    served = CarReader([response.content])
    stored = list(CarReader([car.data]).blocks())  # written leaves first, root last
    assert served.roots == [car.root]
    assert list(served.blocks()) == stored[-1:] + stored[:-1]  # depth first from the root
    raw = fil.http.get(base, headers={"Accept": "application/vnd.ipld.raw"})
    assert raw.headers["content-type"] == "application/vnd.ipld.raw" and raw.content == stored[-1][2]
    head = fil.http.head(base, params={"format": "raw"})
    assert head.status_code == 200 and head.headers["content-length"] == str(len(raw.content))
    assert fil.http.get(base).status_code == 406
    fil.advance(deal["endEpoch"] - fil.head() + 1)
    with pytest.raises(KeyNotFound):
        backend.read(car.root)


def test_corrupt_retrieval_is_caught(fil: FilecoinSim, car: Car, tmp_path: Path) -> None:
    store(fil, car, tmp_path)
    [changed] = [p for p in fil.providers([{"id": "f01000", "retrieval": "corrupt"}]) if p["id"] == "f01000"]
    assert changed["price"] == "100000000" and changed["retrieval"] == "corrupt"  # an upsert keeps the rest
    with pytest.raises(ChecksumMismatch):
        b"".join(gateway(fil, "f01000").read(car.root))
    backend = registry.build(BackendSpec(name="fil-raw", driver="gateway",  # block by block, the same lie
                                         settings={"gateways": [fil.retrieval_url("f01000")], "mode": "raw"}))
    with pytest.raises(ChecksumMismatch):
        b"".join(backend.read(car.root))


def test_retrieval_none_and_other_providers(fil: FilecoinSim, car: Car, tmp_path: Path) -> None:
    store(fil, car, tmp_path)
    with pytest.raises(KeyNotFound):
        gateway(fil, "f01001").read(car.root)  # the data is with f01000 only
    fil.providers([{"id": "f01000", "retrieval": "none"}])
    with pytest.raises(KeyNotFound):
        gateway(fil, "f01000").read(car.root)


def test_store_makes_an_active_deal_and_pieces_are_served(fil: FilecoinSim, car: Car, tmp_path: Path) -> None:
    deal = store(fil, car, tmp_path, verified=True)
    assert deal["state"] == "active" and deal["blocks"] == 4 and deal["label"] == car.root
    chain = rpc(fil, "Filecoin.StateMarketStorageDeal", deal["dealId"], None)["result"]
    assert chain["Proposal"]["VerifiedDeal"] and chain["State"]["SectorStartEpoch"] >= 0
    assert rpc(fil, "Filecoin.StateVerifiedClientStatus", CLIENT, None)["result"] == str(64 * GiB - car.piece_size)
    url = f"/retrieval/f01000/piece/{car.piece_cid}"
    assert fil.http.get(url).content == car.data
    part = fil.http.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == car.data[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(car.data)}"
    assert fil.http.get(url, headers={"Range": f"bytes={len(car.data)}-"}).status_code == 416
    assert fil.http.get(f"/retrieval/f01001/piece/{car.piece_cid}").status_code == 404
    with pytest.raises(SimError, match="commp mismatch"):
        fil.store("f01000", tmp_path / f"{car.piece_cid}.car", piece_cid=make_car(seed=3).piece_cid)


def test_reset_forgets_everything(fil: FilecoinSim, car: Car, tmp_path: Path) -> None:
    store(fil, car, tmp_path)
    fil.reset()
    assert fil.deals() == [] and fil.fetches() == []
    assert fil.http.get("/api/wallet").json() == []
    assert rpc(fil, "Filecoin.StateVerifiedClientStatus", CLIENT, None)["result"] is None
