"""The "storacha" driver: uploads refused with the reason (Storacha no longer accepts them,
docs/storacha.md), reads verified block by block through trustless-gateway fronts over the
real IPFS node (tests/fixtures/gateway.py, in freeway's CAR flavour: dups=y), and a check()
that fails on every answer the protocol does not promise: nothing listening, a name that
does not resolve, a 404, another media type, a wrong block, a redirect to another service."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ferry.errors import (
    BackendUnavailable,
    ChecksumMismatch,
    ConfigError,
    InvalidKey,
    ReadOnlyBackend,
    ServiceDiscontinued,
)
from ferry.settings import BackendSpec
from tests.e2e.test_ipfs_cids import node_cid
from tests.fixtures.gateway import GatewayFront
from workers import registry
from workers.cid import digest_bytes
from workers.storacha import StorachaBackend

pytestmark = pytest.mark.e2e

CHUNK = 262_144


def storacha(*gateways: GatewayFront | str, **settings) -> StorachaBackend:
    urls = [g if isinstance(g, str) else g.url for g in gateways]
    spec = BackendSpec(name="sto", driver="storacha", settings={"gateways": urls, "timeout": 5, **settings})
    backend = registry.build(spec)
    assert isinstance(backend, StorachaBackend)
    return backend


def read_until_error(backend: StorachaBackend, cid: str) -> tuple[bytes, Exception | None]:
    got = bytearray()
    try:
        for chunk in backend.read(cid):
            got += chunk
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return bytes(got), exc
    return bytes(got), None


@pytest.fixture(scope="module")
def file5(ipfs_node) -> tuple[str, bytes]:
    """Five chunks and a bit: a dag-pb root over six raw leaves."""
    data = os.urandom(5 * CHUNK + 99)
    return node_cid(ipfs_node, data), data


@pytest.fixture
def front(gateway_front) -> Callable[..., GatewayFront]:
    """Fronts that send every repeated block (dups=y), as freeway's CARs do."""
    return lambda mode="ok", **kw: gateway_front(mode, dups=True, **kw)


class _Redirector(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(301)
        self.send_header("Location", self.server.target + self.path)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def redirector() -> Iterator[Callable[[str, str], str]]:
    """redirector(host, target) -> the URL, on `host`, of a server that 301s every request
    to the same path under `target`: what w3s.link has done since it forwards to dweb.link."""
    servers: list[ThreadingHTTPServer] = []

    def start(host: str, target: str) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
        server.daemon_threads = True
        server.target = target  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://{host}:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# -- uploads: refused, with the reason, before anything is read or sent -----------------


def test_writes_adds_and_deletes_are_refused_with_the_reason(ipfs_node, front, file5):
    cid, data = file5
    gateway = front()
    backend = storacha(gateway)
    pins_before = ipfs_node.rpc("pin/ls", params={"type": "recursive"}).json()
    consumed = []

    def source():
        consumed.append(True)
        yield data

    key = digest_bytes(b"new bytes").cid
    for call in (lambda: backend.write(key, source()), lambda: backend.write(key, source(), size=9),
                 lambda: backend.add(source()), lambda: backend.add(source(), expect=key),
                 lambda: backend.delete(cid)):
        with pytest.raises(ServiceDiscontinued) as refused:
            call()
        error = refused.value
        assert isinstance(error, ReadOnlyBackend)  # so every read-only path treats it as one
        assert (error.code, error.status, error.transient) == ("service_discontinued", 410, False)
        assert "2026-04-15" in error.message and "2026-05-15" in error.message
        assert "storacha/upload-service#708" in error.message and "sto" in error.message
    assert consumed == []
    assert gateway.requests == []  # nothing was sent anywhere, not even a probe
    assert ipfs_node.rpc("pin/ls", params={"type": "recursive"}).json() == pins_before
    assert read_all(backend, cid) == data  # and the object is still there, unchanged


def test_bad_keys_are_refused_as_keys_first(front):
    backend = storacha(front())
    for call in (lambda: backend.write("not-a-cid", [b"x"]), lambda: backend.delete("../x")):
        with pytest.raises(InvalidKey):
            call()


def test_the_planner_never_places_data_here():
    assert registry.traits("storacha") == (True, True)  # content-addressed, read-only


# -- reads: verified block by block ------------------------------------------------------


def read_all(backend: StorachaBackend, cid: str) -> bytes:
    return b"".join(backend.read(cid, 100_000))


@pytest.mark.parametrize("mode", ["car", "raw"])
def test_reads_are_verified_and_exact(front, file5, mode):
    cid, data = file5
    gateway = front()
    backend = storacha(gateway, mode=mode)
    assert read_all(backend, cid) == data
    assert backend.stat(cid).size == len(data)
    assert set(gateway.formats()) == ({"car", "raw"} if mode == "car" else {"raw"})  # stat is raw


@pytest.mark.parametrize("at", [1, 4], ids=["first-leaf", "mid-file"])
def test_a_lying_gateway_is_refused(front, file5, at):
    cid, data = file5
    got, error = read_until_error(storacha(front("corrupt", at=at)), cid)
    assert isinstance(error, ChecksumMismatch)
    assert data.startswith(got) and len(got) < len(data)  # only verified bytes were yielded


def test_a_fallback_gateway_serves_what_a_lying_one_would_not(front, file5):
    cid, data = file5
    liar, honest = front("corrupt", at=2), front()
    assert read_all(storacha(liar, honest), cid) == data
    assert liar.requests and honest.requests


def test_a_redirect_within_the_gateway_is_followed(front, redirector, file5):
    cid, data = file5
    gateway = front()
    moved = redirector("127.0.0.1", gateway.url)  # the same host: still the same service
    backend = storacha(moved)
    backend.check()
    assert read_all(backend, cid) == data


# -- check(): passes only on the answer the protocol promises ---------------------------


def test_check_passes_on_a_trustless_gateway(front):
    gateway = front()
    storacha(gateway).check()
    assert gateway.requests == [("raw", "bafkqaaa")]


@pytest.mark.parametrize(("mode", "reason"), [
    ("down", "ConnectError"),
    ("missing", "HTTP 404"),  # the probe 404s: not a gateway that holds anything
    ("wrong-type", "not application/vnd.ipld.raw"),
    ("corrupt", "answered the empty block bafkqaaa with bytes"),
])
def test_check_fails_on_a_gateway_that_does_not_answer_the_probe(front, mode, reason):
    with pytest.raises(BackendUnavailable, match=reason) as failed:
        storacha(front(mode)).check()
    assert "reported closed on 2026-05-31" in failed.value.message


def test_check_fails_when_the_name_does_not_resolve():
    # .invalid is reserved (RFC 2606): it never resolves, as w3s.link would not once dropped.
    with pytest.raises(BackendUnavailable, match="ConnectError"):
        storacha("http://w3s-link.invalid", timeout=2).check()


def test_check_fails_when_the_gateway_forwards_to_another_service(front, redirector, file5):
    gateway = front()
    forwarding = redirector("localhost", gateway.url)  # localhost -> 127.0.0.1: another host
    backend = storacha(forwarding)
    with pytest.raises(BackendUnavailable, match="redirects to http://127.0.0.1, another service"):
        backend.check()
    assert gateway.requests == []  # refused before the other service was asked
    # A read still follows the redirect (workers.gateway's client does), verified all the same.
    cid, data = file5
    assert read_all(backend, cid) == data


def test_check_passes_if_any_gateway_answers(front):
    storacha(front("down"), front("missing"), front()).check()


def test_check_with_a_probe_cid_fetches_and_hashes_that_block(front, file5):
    cid, _ = file5
    storacha(front(), probe_cid=cid).check()
    with pytest.raises(BackendUnavailable, match="does not hash to its CID"):
        storacha(front("corrupt"), probe_cid=cid).check()
    absent = digest_bytes(b"never stored " + os.urandom(8)).cid
    with pytest.raises(BackendUnavailable, match="HTTP 404"):
        storacha(front(), probe_cid=absent).check()


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "reason"), [
    ({}, "gateways"),  # no default: Storacha's own gateways no longer serve
    ({"gateways": []}, "gateways"),
    ({"gateways": ["ftp://w3s.link"]}, "http"),
    ({"gateways": ["https://w3s.link"], "timeout": 0}, "timeout"),
    ({"gateways": ["https://w3s.link"], "mode": "unixfs"}, "mode"),
    ({"gateways": ["https://w3s.link"], "probe_cid": "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"}, "CIDv0"),
    ({"gateways": ["https://w3s.link"], "shiny": True}, "shiny"),
    ({"gateways": ["https://w3s.link"], "space_did": "did:key:z6Mk"}, "does not upload, because Storacha"),
    ({"gateways": ["https://w3s.link"], "proof": "mAYIE"}, "does not upload"),
])
def test_settings_are_validated(settings, reason):
    with pytest.raises(ConfigError, match=reason):
        registry.build(BackendSpec(name="sto", driver="storacha", settings=settings))


def test_upload_secrets_by_reference_are_refused_too(monkeypatch):
    monkeypatch.setenv("FERRY_TEST_STORACHA_KEY", "MgCZT5vOnYZoVAeyjnzuJIVI")
    settings = {"gateways": ["https://w3s.link"], "key": {"env": "FERRY_TEST_STORACHA_KEY"}}
    with pytest.raises(ConfigError, match="key: this driver does not upload") as refused:
        registry.build(BackendSpec(name="sto", driver="storacha", settings=settings))
    assert "MgCZT5vOnYZoVAeyjnzuJIVI" not in str(refused.value)


def test_defaults_and_normalised_settings():
    backend = storacha("https://w3s.link/", "https://storacha.link")
    assert backend.config.gateways == ["https://w3s.link", "https://storacha.link"]
    assert (backend.config.mode, backend.config.probe_cid) == ("car", None)
    assert StorachaBackend.content_addressed and StorachaBackend.read_only
