"""OIDC bearer tokens: a JWT from the configured issuer becomes a `Principal`.

Off unless FERRY_OIDC_ISSUER is set. A token must be signed by one of the issuer's keys
(its JWKS, from FERRY_OIDC_JWKS_URL or the issuer's discovery document) with one of
FERRY_OIDC_ALGORITHMS, and carry `exp`, `iss`, `aud` and `sub`. Its role and grants come
from two claims (FERRY_OIDC_ROLE_CLAIM, FERRY_OIDC_GRANTS_CLAIM), in the form API keys have.

The algorithms come from the settings only, never from the token, and are asymmetric
(settings refuse HS* and none): a token cannot make us verify with a public key as an
HMAC secret. Each key set is fetched once and kept; a token naming an unknown key id
makes it fetched again (at most every `_REFRESH_COOLDOWN_SECONDS`), so rotation works.
Every failure is `Unauthenticated`, naming why.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

import jwt

from ferry.catalog.models import Role
from ferry.errors import InvalidRequest
from ferry.security import Principal, Unauthenticated, parse_grants
from ferry.settings import Settings, get_settings

_HTTP_TIMEOUT_SECONDS = 10.0
# How long the key set is kept, and how often an unknown key id may make it fetched again
# (a flood of made-up key ids must not become a flood of requests to the issuer).
_KEYS_LIFESPAN_SECONDS = 300.0
_REFRESH_COOLDOWN_SECONDS = 30.0

_lock = threading.Lock()
_clients: dict[str, jwt.PyJWKClient] = {}  # by JWKS URL
_discovered: dict[str, str] = {}  # issuer -> its jwks_uri


def authenticate(token: str) -> Principal:
    """The principal of an OIDC bearer token; Unauthenticated if it is not valid here."""
    settings = get_settings()
    if settings.oidc_issuer is None:
        raise Unauthenticated("not an API key (fy_...), and no OIDC issuer is configured")
    key = _signing_key(settings, token)
    claims = _decode(settings, token, key)
    return _principal(settings, claims)


def _reset() -> None:
    """Forget the key sets and discovery documents (tests; a changed configuration)."""
    with _lock:
        _clients.clear()
        _discovered.clear()


def _signing_key(settings: Settings, token: str) -> jwt.PyJWK:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"the bearer token is neither an API key (fy_...) nor a JWT: {exc}") from None
    alg = header.get("alg")
    if alg not in settings.oidc_algorithms:
        raise Unauthenticated(f"token algorithm {alg!r} is not accepted (accepted: "
                              f"{', '.join(settings.oidc_algorithms)})")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Unauthenticated("the token names no key id (kid)")
    client = _client(settings)
    try:
        return client.get_signing_key(kid)
    except jwt.PyJWKClientConnectionError as exc:
        raise Unauthenticated(f"cannot fetch the issuer's keys: {exc}") from None
    except ValueError as exc:  # a body that is not JSON
        raise Unauthenticated(f"cannot fetch the issuer's keys: {client.uri} sent no JSON ({exc})") from None
    except jwt.PyJWKClientError as exc:
        raise Unauthenticated(f"unknown key id {kid!r}: not in the issuer's key set ({exc})") from None
    except jwt.PyJWTError as exc:  # a key set without one usable key
        raise Unauthenticated(f"the issuer's key set at {client.uri} is not usable: {exc}") from None


def _client(settings: Settings) -> jwt.PyJWKClient:
    url = settings.oidc_jwks_url or _jwks_uri(settings.oidc_issuer or "")
    with _lock:
        if url not in _clients:
            _clients[url] = jwt.PyJWKClient(url, lifespan=_KEYS_LIFESPAN_SECONDS, timeout=_HTTP_TIMEOUT_SECONDS,
                                            cooldown_duration=_REFRESH_COOLDOWN_SECONDS)
        return _clients[url]


def _jwks_uri(issuer: str) -> str:
    """The issuer's `jwks_uri`, from its discovery document (fetched once)."""
    if issuer in _discovered:
        return _discovered[issuer]
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_SECONDS) as response:
            document = json.load(response)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise Unauthenticated(f"cannot fetch the issuer's keys: {url} answered {exc.code}") from None
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
        raise Unauthenticated(f"cannot fetch the issuer's keys: {url}: {exc}") from None
    jwks_uri = document.get("jwks_uri") if isinstance(document, dict) else None
    if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
        raise Unauthenticated(f"cannot fetch the issuer's keys: {url} names no http(s) jwks_uri")
    with _lock:
        _discovered[issuer] = jwks_uri
    return jwks_uri


def _decode(settings: Settings, token: str, key: jwt.PyJWK) -> dict[str, Any]:
    try:
        return jwt.decode(token, key, algorithms=settings.oidc_algorithms, audience=settings.oidc_audience,
                          issuer=settings.oidc_issuer, leeway=settings.oidc_leeway_seconds,
                          options={"require": ["exp", "iss", "aud", "sub"]})
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("the token has expired") from None
    except jwt.ImmatureSignatureError as exc:
        raise Unauthenticated(f"the token is not valid yet: {exc}") from None
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthenticated(f"the token lacks the {exc.claim!r} claim") from None
    except jwt.InvalidAudienceError:
        raise Unauthenticated(f"the token is not for this API (its aud must be {settings.oidc_audience!r})") from None
    except jwt.InvalidIssuerError:
        raise Unauthenticated(f"the token was not issued by {settings.oidc_issuer!r}") from None
    except jwt.InvalidSignatureError:
        raise Unauthenticated("the token's signature does not verify with the issuer's key") from None
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"the token is not valid: {exc}") from None


def _principal(settings: Settings, claims: dict[str, Any]) -> Principal:
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("the token's sub claim is not a non-empty string")
    role_claim, grants_claim = settings.oidc_role_claim, settings.oidc_grants_claim
    role = claims.get(role_claim)
    if not isinstance(role, str) or role not in [r.value for r in Role]:
        raise Unauthenticated(f"the token's {role_claim!r} claim must be one of "
                              f"{', '.join(r.value for r in Role)}, not {role!r}")
    raw_grants = claims.get(grants_claim, [])
    if not isinstance(raw_grants, list):
        raise Unauthenticated(f"the token's {grants_claim!r} claim must be a list of grants")
    try:
        grants = parse_grants(raw_grants)
    except InvalidRequest as exc:
        raise Unauthenticated(f"the token's {grants_claim!r} claim is not valid: {exc.field}: {exc.message}") from None
    name = next((claims[c] for c in ("name", "preferred_username") if isinstance(claims.get(c), str) and claims[c]),
                subject)
    return Principal(kind="oidc", id=subject, name=name, role=Role(role), grants=grants)
