"""Who may do what: API keys, principals, roles and per-backend grants, checked in one place.

A request's credentials become a `Principal` (an API key, or an OIDC bearer token when an
issuer is configured); every API operation declares the permission it needs (`read`,
`operate` or `admin`, see api.openapi.operation) and the views that touch backends ask
`require_backends`. The CLI goes through the API, so the same checks hold for it.

Roles: `viewer` reads the catalog (jobs, policies, objects, events, metrics); `operator`
also submits and cancels jobs, applies policies and labels objects; `admin` does
everything, on every backend, and alone manages keys, reads the audit log and sets legal
holds. Operators and viewers touch backends through grants only: `{"backends": "ipfs-*",
"access": "write"}` (an fnmatch pattern; write includes read). Reading an object's bytes
needs read on a backend holding it; a replicate job needs read on its source and write on
its targets; a migrate job also needs write on its source (it deletes there).

API keys look like `fy_<prefix>_<secret>`: 190 bits of randomness, so a plain sha256 of
the whole key is what is stored (a slow password hash buys nothing against keys that
cannot be guessed); `prefix` finds the row and names the key in lists and the audit log.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ferry.catalog.models import ApiKey, Role, utcnow
from ferry.errors import FerryError, InvalidRequest

KEY_PREFIX = "fy_"
PERMISSIONS = ("read", "operate", "admin")
_ROLE_PERMISSIONS = {Role.viewer: {"read"}, Role.operator: {"read", "operate"},
                     Role.admin: {"read", "operate", "admin"}}


class Unauthenticated(FerryError):
    """Raised when a request has no credentials, or ones that are wrong, expired or revoked."""

    code = "unauthenticated"
    status = 401


class RateLimited(FerryError):
    """Raised when a caller exceeds its request rate; `retry_after` is in seconds."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, details={"retry_after": retry_after})
        self.retry_after = retry_after


class Forbidden(FerryError):
    """Raised when the credentials are good but lack a permission (named in the message)."""

    code = "forbidden"
    status = 403


@dataclass(frozen=True)
class Grant:
    backends: str  # fnmatch pattern over backend names
    access: str    # read | write

    def allows(self, backend: str, access: str) -> bool:
        return fnmatch.fnmatchcase(backend, self.backends) and (self.access == "write" or access == "read")


@dataclass(frozen=True)
class Principal:
    kind: str         # key | oidc
    id: str           # the key's prefix, or the token's subject
    name: str
    role: Role
    grants: tuple[Grant, ...] = field(default=())

    def can(self, permission: str) -> bool:
        return permission in _ROLE_PERMISSIONS[self.role]

    def may(self, backend: str, access: str) -> bool:
        return self.role == Role.admin or any(g.allows(backend, access) for g in self.grants)


def parse_grants(raw: Iterable[object]) -> tuple[Grant, ...]:
    """Grants from their JSON form, or from the CLI's `read:pattern` / `write:pattern`."""
    grants = []
    for i, g in enumerate(raw):
        if isinstance(g, str):
            access, sep, pattern = g.partition(":")
            g = {"access": access, "backends": pattern} if sep else {}
        if not isinstance(g, dict) or set(g) != {"backends", "access"}:
            raise InvalidRequest("a grant is {backends: PATTERN, access: read|write} (or 'read:PATTERN')",
                                 field=f"grants[{i}]")
        if g["access"] not in ("read", "write") or not isinstance(g["backends"], str) or not g["backends"]:
            raise InvalidRequest("a grant's access is read or write, over a non-empty backend pattern",
                                 field=f"grants[{i}]")
        grants.append(Grant(g["backends"], g["access"]))
    return tuple(grants)


def check(principal: Principal, permission: str) -> None:
    if not principal.can(permission):
        raise Forbidden(f"permission {permission!r} is needed; {principal.kind} {principal.id!r} has role "
                        f"{principal.role.value}", details={"missing": permission})


def require_backends(principal: Principal, access: str, backends: Iterable[str]) -> None:
    """Forbidden naming the first backend `principal` may not `access` (read or write)."""
    for backend in backends:
        if not principal.may(backend, access):
            raise Forbidden(f"permission {access}:{backend} ({access} on backend {backend!r}) is not granted to "
                            f"{principal.kind} {principal.id!r}", details={"missing": f"{access}:{backend}"})


# -- API keys -----------------------------------------------------------------------------


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, *, name: str, role: Role, grants: Sequence[object] = (),
               expires_at: datetime | None = None, created_by: str | None = None) -> tuple[ApiKey, str]:
    """A new key: (its row, the key itself — shown once, never stored)."""
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidRequest("expires_at is in the past", field="expires_at")
    parsed = parse_grants(grants)
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(24)}"
    row = ApiKey(prefix=prefix, key_hash=_hash(key), name=name, role=role, expires_at=expires_at,
                 grants=[{"backends": g.backends, "access": g.access} for g in parsed], created_by=created_by)
    session.add(row)
    session.flush()
    return row, key


def authenticate_key(session: Session, key: str) -> Principal:
    """The principal of an API key; Unauthenticated if it is unknown, expired or revoked."""
    _, _, rest = key.partition(KEY_PREFIX)
    prefix, sep, _ = rest.partition("_")
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).first() if sep else None
    # Compare even when nothing matched, so timing does not tell a known prefix apart.
    expected = row.key_hash if row is not None else _hash("")
    if not hmac.compare_digest(expected, _hash(key)) or row is None:
        raise Unauthenticated("the API key is not valid")
    now = utcnow()
    if row.revoked_at is not None:
        raise Unauthenticated(f"API key {prefix} was revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthenticated(f"API key {prefix} expired at {row.expires_at.isoformat()}")
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        row.last_used_at = now  # coarse, so a busy key does not write on every call
    return Principal("key", prefix, row.name, row.role, parse_grants(row.grants))


def keys_exist(session: Session) -> bool:
    return session.scalars(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)).first() is not None


# -- the CLI's key, and the embedded server's first one --------------------------------------


def read_key_file(path: Path) -> str | None:
    """The key in `path`, or None if there is no such file. A file others may read is
    refused (Unauthenticated names the fix): a key is as good as a password."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & 0o077:
        raise Unauthenticated(f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                              f"run: chmod 600 {path}")
    return path.read_text(encoding="utf-8").strip() or None


def write_key_file(path: Path, key: str) -> None:
    """Store `key` in a new 0600 file (created with that mode: never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")


def bootstrap_admin_key(session: Session, path: Path) -> str | None:
    """On an embedded server's first start (no key at all yet): create an admin key and
    store it in `path`. Returns the key's prefix, or None when keys already exist."""
    if session.scalars(select(ApiKey.id).limit(1)).first() is not None:
        return None
    row, key = create_key(session, name="embedded admin (ferry serve)", role=Role.admin, created_by="ferry serve")
    if path.exists():  # a stale file from another catalog: keep it aside, never overwrite silently
        path.replace(path.with_suffix(".key.old"))
    write_key_file(path, key)
    return row.prefix


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- rate limits ---------------------------------------------------------------------------


class RateLimits:
    """Moving-window limits (the `limits` library) per caller and per failing client address,
    counted in shared storage (Redis in a cluster), so every API process sees one count."""

    # `limits` imports the storage's client library on first use and reads its __version__;
    # a second thread doing so meanwhile finds the module half-imported (no __version__ yet)
    # and is refused ("minimum version of 3.0 for 'redis' ... Found version: 0.0.0"): the
    # first requests of a threaded API process got 500s. One construction at a time.
    _building = threading.Lock()

    def __init__(self, storage_uri: str, per_caller: str, per_failing_address: str):
        from limits import parse
        from limits.storage import storage_from_string
        from limits.strategies import MovingWindowRateLimiter

        with self._building:
            self.limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))
        self.per_caller = parse(per_caller)
        self.per_failing_address = parse(per_failing_address)

    def _hit(self, limit, *identity: str) -> None:
        if not self.limiter.hit(limit, "ferry", *identity):
            reset_at = self.limiter.get_window_stats(limit, "ferry", *identity).reset_time
            retry = max(1, int(reset_at - time.time() + 0.999))
            raise RateLimited(f"rate limit {limit} exceeded; retry in {retry} s", retry)

    def caller(self, principal: Principal) -> None:
        self._hit(self.per_caller, principal.kind, principal.id)

    def failed_authentication(self, address: str) -> None:
        self._hit(self.per_failing_address, "auth-failure", address)


@functools.cache
def rate_limits() -> RateLimits:
    from ferry.settings import get_settings

    settings = get_settings()
    storage = settings.rate_limit_storage or (
        settings.broker if settings.broker.startswith(("redis://", "rediss://")) else "memory://")
    return RateLimits(storage, settings.rate_limit, settings.auth_failure_limit)


# -- endpoints given through the API (SSRF) --------------------------------------------------

# Cloud metadata services: never, whatever the allow-list says.
_METADATA = [ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128",
                                                "100.100.100.200/32", "0.0.0.0/8", "::/128")]
_METADATA_NAMES = {"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"}


class EndpointRefused(InvalidRequest):
    """Raised when a URL given through the API points where Ferry must not connect."""

    code = "endpoint_refused"


def check_endpoint(url: str, allowlist: Sequence[str], *, field: str = "url",
                   resolve=None) -> None:
    """Refuse (EndpointRefused) a URL unless it is http(s) to a host the allow-list names,
    every address it resolves to is in an allow-listed CIDR or was named by host pattern,
    and none is a metadata service or link-local. Resolution is checked here, so a name
    that resolves to 169.254.169.254 is refused too."""
    from urllib.parse import urlsplit

    resolve = resolve or _resolve
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise EndpointRefused(f"{url!r} is not a URL: {exc}", field=field) from None
    host = (parts.hostname or "").lower().rstrip(".")
    if parts.scheme not in ("http", "https") or not host:
        raise EndpointRefused(f"{url!r}: only http(s) URLs with a host are accepted", field=field)
    if parts.username or parts.password:
        raise EndpointRefused(f"{url!r}: credentials in a URL are refused; use the driver's secret settings",
                              field=field)
    if host in _METADATA_NAMES:
        raise EndpointRefused(f"{host} is a cloud metadata service: never reachable through Ferry", field=field)
    nets = []
    by_name = False
    for entry in allowlist:
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            by_name = by_name or fnmatch.fnmatchcase(host, entry.lower())
    try:
        addresses = resolve(host, port or (443 if parts.scheme == "https" else 80))
    except OSError as exc:
        raise EndpointRefused(f"{host} does not resolve ({exc})", field=field) from None
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if any(ip in net for net in _METADATA) or ip.is_multicast:
            raise EndpointRefused(f"{host} resolves to {ip}, a link-local/metadata address: refused", field=field)
        if not by_name and not any(ip in net for net in nets):
            raise EndpointRefused(
                f"{host} ({ip}) is not in FERRY_ENDPOINT_ALLOWLIST: endpoints given through the API must be "
                "allow-listed", field=field)


def _resolve(host: str, port: int) -> list[str]:
    import socket

    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})


def urls_in(settings: object, path: str = "settings") -> list[tuple[str, str]]:
    """Every URL in a backend's settings (any string with '://'), with its dotted place."""
    found = []
    if isinstance(settings, dict):
        for k, v in settings.items():
            found += urls_in(v, f"{path}.{k}")
    elif isinstance(settings, list):
        for i, v in enumerate(settings):
            found += urls_in(v, f"{path}[{i}]")
    elif isinstance(settings, str) and "://" in settings:
        found.append((path, settings))
    return found
