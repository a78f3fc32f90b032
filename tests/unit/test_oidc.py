"""OIDC bearer tokens against a local issuer: a key set served over HTTP, tokens signed here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ferry import oidc
from ferry.catalog.models import Role
from ferry.errors import ConfigError
from ferry.security import Grant, Unauthenticated
from ferry.settings import get_settings

AUDIENCE = "ferry-api"


class Issuer:
    """An OIDC issuer on 127.0.0.1: a discovery document and a JWKS it can change."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}  # kid -> private key
        self.published: list[str] = []  # kids in the JWKS
        self.jwks_fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_fetches += 1
                    body = {"keys": [issuer.jwk(kid) for kid in issuer.published]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add_key(self, kid: str, kind: str = "rsa", *, publish: bool = True) -> None:
        self.keys[kid] = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
                          else ec.generate_private_key(ec.SECP256R1()))
        if publish:
            self.published.append(kid)

    def jwk(self, kid: str) -> dict[str, Any]:
        key = self.keys[kid]
        algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
        return {**algorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}

    def token(self, kid: str = "rsa-1", *, alg: str | None = None, signer: str | None = None,
              drop: tuple[str, ...] = (), **claims: Any) -> str:
        key = self.keys[signer or kid]
        now = int(time.time())
        payload = {"iss": self.url, "aud": AUDIENCE, "sub": "user-42", "iat": now, "exp": now + 300,
                   "ferry_role": "operator", "ferry_grants": [{"backends": "ipfs-*", "access": "write"}]}
        payload.update(claims)
        for name in drop:
            payload.pop(name)
        alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)
            self.server = None


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    oidc._reset()
    get_settings.cache_clear()
    yield
    oidc._reset()
    get_settings.cache_clear()


@pytest.fixture
def issuer(monkeypatch: pytest.MonkeyPatch) -> Iterator[Issuer]:
    """A running issuer with an RSA and an EC key, configured as Ferry's (via discovery)."""
    server = Issuer()
    server.add_key("rsa-1", "rsa")
    server.add_key("ec-1", "ec")
    monkeypatch.setenv("FERRY_OIDC_ISSUER", server.url)
    monkeypatch.setenv("FERRY_OIDC_AUDIENCE", AUDIENCE)
    try:
        yield server
    finally:
        server.stop()


def test_valid_rs256_and_es256_tokens_become_principals(issuer):
    rs = oidc.authenticate(issuer.token("rsa-1", name="Ada Lovelace"))
    assert (rs.kind, rs.id, rs.name, rs.role) == ("oidc", "user-42", "Ada Lovelace", Role.operator)
    assert rs.grants == (Grant("ipfs-*", "write"),)
    assert rs.can("operate") and not rs.can("admin") and rs.may("ipfs-a", "write") and not rs.may("s3", "read")

    es = oidc.authenticate(issuer.token("ec-1", sub="svc", preferred_username="robot", ferry_role="viewer",
                                        ferry_grants=["read:s3-*"]))
    assert (es.id, es.name, es.role, es.grants) == ("svc", "robot", Role.viewer, (Grant("s3-*", "read"),))
    assert issuer.jwks_fetches == 1  # the key set is kept


def test_name_falls_back_to_subject_and_grants_to_none(issuer):
    principal = oidc.authenticate(issuer.token(ferry_role="admin", drop=("ferry_grants",)))
    assert (principal.name, principal.role, principal.grants) == ("user-42", Role.admin, ())


def test_keys_found_through_discovery_or_an_explicit_url(issuer, monkeypatch):
    oidc.authenticate(issuer.token())
    assert oidc._discovered == {issuer.url: issuer.url + "/jwks"}
    oidc._reset()
    monkeypatch.setenv("FERRY_OIDC_JWKS_URL", issuer.url + "/jwks")
    get_settings.cache_clear()
    oidc.authenticate(issuer.token())
    assert oidc._discovered == {}


# Times are offsets from when the test runs, not from collection: a long suite would
# otherwise run this past the instants it names (a "future" nbf already passed).
@pytest.mark.parametrize("claims,message", [
    ({"exp": -120}, "expired"),
    ({"nbf": +600}, "not valid yet"),
    ({"aud": "another-api"}, "not for this API"),
    ({"iss": "https://evil.example"}, "not issued by"),
    ({"drop": ("exp",)}, "lacks the 'exp' claim"),
    ({"drop": ("sub",)}, "lacks the 'sub' claim"),
])
def test_bad_claims_are_refused(issuer, claims, message):
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "nbf") else v for k, v in claims.items()}
    with pytest.raises(Unauthenticated, match=message):
        oidc.authenticate(issuer.token(**claims))


def test_leeway_forgives_a_little_clock_skew(issuer):
    oidc.authenticate(issuer.token(exp=int(time.time()) - 10))


def test_signature_by_a_key_not_in_the_set_is_refused(issuer):
    issuer.add_key("rogue", "rsa", publish=False)
    with pytest.raises(Unauthenticated, match="signature does not verify"):
        oidc.authenticate(issuer.token("rsa-1", signer="rogue"))  # claims a published kid
    with pytest.raises(Unauthenticated, match="unknown key id 'rogue'"):
        oidc.authenticate(issuer.token("rogue"))


def test_a_rotated_in_key_is_fetched_when_a_token_names_it(issuer, monkeypatch):
    monkeypatch.setattr(oidc, "_REFRESH_COOLDOWN_SECONDS", 0.0)
    oidc.authenticate(issuer.token("rsa-1"))
    issuer.add_key("rsa-2", "rsa", publish=False)
    with pytest.raises(Unauthenticated, match="unknown key id 'rsa-2'"):
        oidc.authenticate(issuer.token("rsa-2"))
    issuer.published.append("rsa-2")
    assert oidc.authenticate(issuer.token("rsa-2")).id == "user-42"


def test_unknown_key_ids_do_not_refetch_within_the_cooldown(issuer):
    oidc.authenticate(issuer.token("rsa-1"))
    issuer.add_key("rsa-2", "rsa", publish=False)
    for _ in range(3):
        with pytest.raises(Unauthenticated, match="unknown key id"):
            oidc.authenticate(issuer.token("rsa-2"))
    assert issuer.jwks_fetches == 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest() if secret else b""
    return f"{signing_input}.{_b64(signature)}"


def _claims(issuer: Issuer) -> dict[str, Any]:
    return jwt.decode(issuer.token(), options={"verify_signature": False})


def test_alg_none_is_refused(issuer):
    token = _forge({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, _claims(issuer), None)
    with pytest.raises(Unauthenticated, match="algorithm 'none' is not accepted"):
        oidc.authenticate(token)


def test_hs256_with_the_public_key_as_secret_is_refused(issuer):
    public_pem = issuer.keys["rsa-1"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    token = _forge({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, _claims(issuer), public_pem)
    with pytest.raises(Unauthenticated, match="algorithm 'HS256' is not accepted"):
        oidc.authenticate(token)


def test_a_token_whose_alg_does_not_fit_its_key_is_refused(issuer):
    # Signed ES256 but naming the RSA key: the key, not the token, decides the algorithm.
    token = jwt.encode(_claims(issuer), issuer.keys["ec-1"], algorithm="ES256", headers={"kid": "rsa-1"})
    with pytest.raises(Unauthenticated, match="does not match the key's algorithm"):
        oidc.authenticate(token)


@pytest.mark.parametrize("claims,message", [
    ({"drop": ("ferry_role",)}, "'ferry_role' claim must be one of admin, operator, viewer, not None"),
    ({"ferry_role": "root"}, "'ferry_role' claim must be one of .* not 'root'"),
    ({"ferry_role": ["admin"]}, "'ferry_role' claim"),
    ({"ferry_grants": "write:*"}, "'ferry_grants' claim must be a list"),
    ({"ferry_grants": [{"backends": "*", "access": "delete"}]}, r"'ferry_grants' claim is not valid: grants\[0\]"),
    ({"ferry_grants": ["everything"]}, "'ferry_grants' claim is not valid"),
])
def test_bad_role_or_grants_claims_are_refused(issuer, claims, message):
    with pytest.raises(Unauthenticated, match=message):
        oidc.authenticate(issuer.token(**claims))


def test_claim_names_come_from_settings(issuer, monkeypatch):
    monkeypatch.setenv("FERRY_OIDC_ROLE_CLAIM", "https://ferry/role")
    get_settings.cache_clear()
    principal = oidc.authenticate(issuer.token(**{"https://ferry/role": "viewer"}))
    assert principal.role == Role.viewer
    with pytest.raises(Unauthenticated, match="'https://ferry/role' claim"):
        oidc.authenticate(issuer.token())


def test_garbage_is_refused(issuer):
    with pytest.raises(Unauthenticated, match="neither an API key .* nor a JWT"):
        oidc.authenticate("not-a-token")
    token = jwt.encode(_claims(issuer), issuer.keys["rsa-1"], algorithm="RS256")  # no kid
    with pytest.raises(Unauthenticated, match="no key id"):
        oidc.authenticate(token)


def test_an_issuer_that_is_down_is_unauthenticated_not_an_error(issuer, monkeypatch):
    token = issuer.token()
    issuer.stop()
    with pytest.raises(Unauthenticated, match="cannot fetch the issuer's keys"):  # discovery
        oidc.authenticate(token)
    monkeypatch.setenv("FERRY_OIDC_JWKS_URL", issuer.url + "/jwks")
    get_settings.cache_clear()
    with pytest.raises(Unauthenticated, match="cannot fetch the issuer's keys"):  # the JWKS itself
        oidc.authenticate(token)


def test_a_missing_jwks_is_unauthenticated(issuer, monkeypatch):
    monkeypatch.setenv("FERRY_OIDC_JWKS_URL", issuer.url + "/nothing-here")
    get_settings.cache_clear()
    with pytest.raises(Unauthenticated, match="cannot fetch the issuer's keys"):
        oidc.authenticate(issuer.token())


def test_oidc_off_without_an_issuer(monkeypatch):
    monkeypatch.delenv("FERRY_OIDC_ISSUER", raising=False)
    with pytest.raises(Unauthenticated, match=r"not an API key \(fy_...\), and no OIDC issuer is configured"):
        oidc.authenticate("eyJhbGciOiJSUzI1NiJ9.e30.x")


@pytest.mark.parametrize("env,message", [
    ({"FERRY_OIDC_ISSUER": "https://id.example"}, "FERRY_OIDC_AUDIENCE is required with FERRY_OIDC_ISSUER"),
    ({"FERRY_OIDC_ALGORITHMS": '["RS256", "HS256"]'}, "must be asymmetric"),
    ({"FERRY_OIDC_ALGORITHMS": '["none"]'}, "must be asymmetric"),
    ({"FERRY_OIDC_ALGORITHMS": "[]"}, "oidc_algorithms"),
    ({"FERRY_OIDC_JWKS_URL": "file:///etc/passwd"}, "http"),
])
def test_unsafe_or_incomplete_oidc_settings_are_refused(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        get_settings()
