"""Authentication, authorization and the audit log, through the API.

The matrix test walks every operation the API publishes (api.openapi.OPERATIONS) with
every role, granted and not granted the backends the request touches, and checks that
each call is let through or refused with 401/403 exactly as ferry.security says.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import uuid
from datetime import timedelta

import pytest
import yaml
from sqlalchemy import select, text

from api import (  # noqa: F401  (register)
    access,
    backends,
    create_app,
    deals,
    events,
    health,
    jobs,
    metrics,
    objects,
    policies,
    search,
)
from api.openapi import OPERATIONS
from ferry.catalog.db import transaction
from ferry.catalog.models import (
    ApiKey,
    AuditEntry,
    Deal,
    DealSchedule,
    DealState,
    Piece,
    Provider,
    Replica,
    ReplicaState,
    Role,
    StoredObject,
    utcnow,
)
from ferry.security import create_key, read_key_file, write_key_file
from ferry.settings import get_settings
from workers.cid import digest_bytes

PREFIX = f"sec-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def app():
    return create_app({"TESTING": True})


def make_key(role: Role, grants=(), **kw) -> str:
    with transaction() as session:
        _, key = create_key(session, name=f"test {role.value}", role=role, grants=list(grants), **kw)
    return key


def call(app, key: str | None, method: str, path: str, **kw):
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = client.open(path, method=method, headers=headers, **kw)
    response.get_data()  # a streamed body (object content) is read to the end, as a client would
    response.close()
    return response


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {
        "admin": make_key(Role.admin),
        "operator granted": make_key(Role.operator, [{"backends": "*", "access": "write"}]),
        "operator ungranted": make_key(Role.operator),
        "viewer granted": make_key(Role.viewer, [{"backends": "*", "access": "read"}]),
        "viewer ungranted": make_key(Role.viewer),
    }


@pytest.fixture(scope="module")
def world(app, keys):
    """A job, a policy, an object with a replica on `local`, a key to revoke."""
    admin = keys["admin"]
    data = b"matrix object " + PREFIX.encode()
    d = digest_bytes(data)
    root = get_settings().backends()["local"].settings["root"]
    path = os.path.join(root, PREFIX, "obj")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    with transaction() as session:
        obj = StoredObject(cid=d.cid, sha256=d.sha256, size=d.size)
        session.add(obj)
        session.flush()
        session.add(Replica(object_id=obj.id, backend="local", key=f"{PREFIX}/obj", state=ReplicaState.present,
                            verified_at=utcnow()))
    # An object on `archive` for the delete operation (the others keep theirs).
    doomed = b"matrix object to delete " + PREFIX.encode()
    dd = digest_bytes(doomed)
    archive = get_settings().backends()["archive"].settings["root"]
    os.makedirs(os.path.join(archive, PREFIX), exist_ok=True)
    with open(os.path.join(archive, PREFIX, "doomed"), "wb") as f:
        f.write(doomed)
    with transaction() as session:
        obj = StoredObject(cid=dd.cid, sha256=dd.sha256, size=dd.size)
        session.add(obj)
        session.flush()
        session.add(Replica(object_id=obj.id, backend="archive", key=f"{PREFIX}/doomed", state=ReplicaState.present,
                            verified_at=utcnow()))
    r = call(app, admin, "POST", "/v1/jobs", json={"kind": "replicate", "source": {"backend": "local",
                                                   "keys": [f"{PREFIX}/obj"]}, "targets": [{"backend": "archive"}]})
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["id"]
    policy = {"name": PREFIX, "selector": {"prefix": f"{PREFIX}-none/"},
              "placement": {"backends": "tier=hot", "replicas": 1}, "schedule": "manual"}
    r = call(app, admin, "POST", "/v1/policies", json={"document": policy})
    assert r.status_code == 201, r.get_json()
    # Filecoin: a provider, a piece with a deal in flight, a schedule named like the policy
    # (catalog rows: the matrix's app has no filecoin backend, so deals cannot be made here).
    provider = f"f0{uuid.uuid4().int % 10**9}"
    with transaction() as session:
        session.add(Provider(id=provider, region="matrix", price=1, verified_price=0, min_piece_size=256,
                             max_piece_size=2**36, verified=True, created_at=utcnow(), updated_at=utcnow()))
        piece = Piece(piece_cid=f"baga6ea4seaq{uuid.uuid4().hex}", padded_size=256, car_size=200,
                      root_cid=d.cid, backend="filecoin")
        session.add(piece)
        session.flush()
        deal = Deal(id=uuid.uuid4(), piece_id=piece.id, backend="filecoin", provider=provider, client="f01234",
                    state=DealState.proposed, verified=False, duration=3000, attempt=1, created_at=utcnow(),
                    updated_at=utcnow())
        session.add(deal)
        session.add(DealSchedule(name=PREFIX, backend="filecoin", spec={"schedule": {"every": "1h"}}, paused=True,
                                 created_at=utcnow(), updated_at=utcnow()))
    return {"job_id": job_id, "name": PREFIX, "cid": d.cid, "doomed_cid": dd.cid, "policy": policy,
            "deal_id": str(deal.id),
            "provider_id": provider, "piece_cid": piece.piece_cid}


def sample(op, world: dict, revocable: str) -> tuple[str, dict]:
    """A request for `op` that touches backends local (read) and archive (write)."""
    params = {"job_id": world["job_id"], "name": world["name"], "cid": world["cid"], "prefix": revocable,
              "deal_id": world["deal_id"], "provider_id": world["provider_id"], "piece_cid": world["piece_cid"]}
    if op.endpoint == "objects.delete":
        params["cid"] = world["doomed_cid"]
    path = op.path.format(**{p: params[p] for p in op.path_params})
    if op.endpoint == "event_stream.stream":  # a stream about the job (reading both its backends), one look long
        path += f"?job={world['job_id']}&max_seconds=0"
    body = None
    if op.body is not None:
        body = {
            "jobs.create": {"kind": "replicate", "source": {"backend": "local", "keys": [f"{PREFIX}/obj"]},
                            "targets": [{"backend": "archive"}]},
            "policies.apply": {"document": world["policy"]},
            "objects.label": {"tags": ["matrix"]},
            "objects.hold": {"hold": False},
            "keys.create_key": {"name": "from the matrix", "role": "viewer"},
            "backends.check": {"driver": "s3", "settings": {"bucket": "b", "endpoint_url": "http://169.254.169.254"}},
            "deals.quote": {"source": {"backend": "local", "prefix": f"{PREFIX}/"}, "backend": "filecoin"},
            "providers.put_provider": {"id": world["provider_id"], "region": "matrix"},
            "search.query": {"query": "matrix object", "mode": "text"},
            "schedules.put_schedule": {"name": f"{PREFIX}-made", "source": {"backend": "local", "prefix": "x/"},
                                       "backend": "archive", "schedule": {"every": "1h"}},
        }[op.endpoint]
    return path, {"json": body} if body is not None else {}


# Backend-scoped operations: what a role's grants must cover for them.
NEEDS_WRITE = {"jobs.create", "jobs.cancel", "objects.delete", "policies.apply", "policies.delete", "policies.run", "policies.retry",
               "deals.retry", "schedules.put_schedule", "schedules.pause_schedule", "schedules.resume_schedule",
               "schedules.delete_schedule"}
NEEDS_READ = {"objects.content", "objects.text", "deals.quote", "event_stream.stream"}
# Public, but behind its own credential: a piece opens to its deal's token, never to an API key.
OWN_TOKEN = {"pieces.piece"}
ROLE = {"admin": Role.admin, "operator granted": Role.operator, "operator ungranted": Role.operator,
        "viewer granted": Role.viewer, "viewer ungranted": Role.viewer}
RANK = {"read": {Role.viewer, Role.operator, Role.admin}, "operate": {Role.operator, Role.admin},
        "admin": {Role.admin}}


def allowed(who: str, op) -> bool:
    if op.permission == "public":
        return True
    role = ROLE[who]
    if role not in RANK[op.permission]:
        return False
    if role == Role.admin:
        return True
    if op.endpoint in NEEDS_WRITE:
        return who == "operator granted"
    if op.endpoint in NEEDS_READ:
        return who in ("operator granted", "viewer granted")
    return True


# Refused roles first: an allowed call may change what a later one finds (a deleted policy).
ORDER = ["viewer ungranted", "viewer granted", "operator ungranted", "operator granted", "admin"]


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: f"{op.method.upper()} {op.path}")
def test_every_operation_by_every_role_granted_or_not(app, keys, world, op):
    for who in ORDER:
        revocable = make_key(Role.viewer).split("_")[1]
        path, kw = sample(op, world, revocable)
        r = call(app, keys[who], op.method.upper(), path, **kw)
        if op.endpoint in OWN_TOKEN:
            assert r.status_code == 401, (who, op.endpoint, r.status_code)
            assert call(app, None, op.method.upper(), path, **kw).status_code == 401
            continue
        if allowed(who, op):
            assert r.status_code not in (401, 403), (who, op.endpoint, r.status_code, r.get_data(as_text=True))
        else:
            assert r.status_code == 403, (who, op.endpoint, r.status_code, r.get_data(as_text=True))
            error = r.get_json()["error"]
            assert error["code"] == "forbidden" and error["details"]["missing"] in error["message"]
        if op.permission != "public":  # and never without credentials
            anonymous = call(app, None, op.method.upper(), path, **kw)
            assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        else:
            assert call(app, None, op.method.upper(), path, **kw).status_code in (200, 503)
        if op.endpoint == "policies.delete" and r.status_code == 200:  # put it back for the next role
            assert call(app, keys["admin"], "POST", "/v1/policies", json={"document": world["policy"]}).status_code == 201


def test_the_openapi_document_needs_credentials_too(app, keys):
    assert call(app, None, "GET", "/v1/openapi.json").status_code == 401
    assert call(app, keys["viewer ungranted"], "GET", "/v1/openapi.json").status_code == 200
    assert call(app, None, "GET", "/v1/no-such-route").status_code == 401  # no route discovery unauthenticated


def test_partial_grants_read_one_backend_write_another(app):
    key = make_key(Role.operator, ["read:local", "write:arch*"])
    body = {"kind": "replicate", "source": {"backend": "local", "keys": [f"{PREFIX}/obj"]},
            "targets": [{"backend": "archive"}]}
    assert call(app, key, "POST", "/v1/jobs", json=body).status_code == 202
    r = call(app, key, "POST", "/v1/jobs", json={**body, "kind": "migrate"})  # deletes at local: needs write
    assert r.status_code == 403 and r.get_json()["error"]["details"]["missing"] == "write:local"
    r = call(app, key, "POST", "/v1/jobs", json={**body, "targets": [{"backend": "mirror"}]})
    assert r.status_code == 403 and r.get_json()["error"]["details"]["missing"] == "write:mirror"
    r = call(app, key, "POST", "/v1/jobs", json={**body, "source": {"backend": "s3", "keys": ["x"]}})
    assert r.status_code == 403 and r.get_json()["error"]["details"]["missing"] == "read:s3"


@pytest.mark.parametrize("credentials", ["", "Bearer", "Bearer fy_nope_nope", "Basic Zm9vOmJhcg==", "Bearer " + "x" * 5000,
                                         "Bearer fy_\x00"])
def test_bad_credentials_get_401(app, credentials):
    r = app.test_client().get("/v1/jobs", headers={"Authorization": credentials} if credentials else {})
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "unauthenticated"


def test_expired_and_revoked_keys_are_refused(app, keys):
    soon = make_key(Role.viewer, expires_at=utcnow() + timedelta(seconds=30))
    assert call(app, soon, "GET", "/v1/jobs").status_code == 200
    with transaction() as session:  # time passes
        session.execute(text("UPDATE api_keys SET expires_at = :t WHERE prefix = :p"),
                        {"t": utcnow() - timedelta(seconds=1), "p": soon.split("_")[1]})
    r = call(app, soon, "GET", "/v1/jobs")
    assert r.status_code == 401 and "expired" in r.get_json()["error"]["message"]

    doomed = make_key(Role.operator)
    prefix = doomed.split("_")[1]
    r = call(app, keys["admin"], "DELETE", f"/v1/keys/{prefix}")
    assert r.status_code == 200 and r.get_json()["revoked_at"]
    r = call(app, doomed, "GET", "/v1/jobs")
    assert r.status_code == 401 and "revoked" in r.get_json()["error"]["message"]


def test_keys_are_shown_once_and_stored_as_hashes(app, keys):
    r = call(app, keys["admin"], "POST", "/v1/keys", json={"name": "ci", "role": "operator",
                                                          "grants": [{"backends": "ipfs-*", "access": "write"}]})
    assert r.status_code == 201
    created = r.get_json()
    key = created["key"]
    assert key.startswith(f"fy_{created['prefix']}_") and len(key) > 40
    with transaction() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.prefix == created["prefix"])).one()
        assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert key not in str([getattr(row, c.name) for c in ApiKey.__table__.columns])
    listed = call(app, keys["admin"], "GET", "/v1/keys").get_data(as_text=True)
    assert created["prefix"] in listed and key not in listed
    assert call(app, key, "GET", "/v1/jobs").status_code == 200
    bad = call(app, keys["admin"], "POST", "/v1/keys", json={"name": "x", "role": "root"})
    assert bad.status_code == 422


def test_mutating_and_refused_calls_are_audited_and_the_log_is_append_only(app, keys):
    viewer, admin = keys["viewer ungranted"], keys["admin"]
    body = {"kind": "replicate", "source": {"backend": "local", "keys": [f"{PREFIX}/obj"]},
            "targets": [{"backend": "archive"}]}
    ok = call(app, admin, "POST", "/v1/jobs", json=body, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert ok.status_code == 202
    assert call(app, viewer, "POST", "/v1/jobs", json=body).status_code == 403
    assert call(app, None, "DELETE", "/v1/policies/whatever").status_code == 401
    assert call(app, "fy_bogus_key", "GET", "/v1/jobs").status_code == 401

    entries = call(app, admin, "GET", "/v1/audit", query_string={"limit": 20}).get_json()["entries"]
    job_id = ok.get_json()["id"]
    created = next(e for e in entries if e["job_id"] == job_id)
    assert (created["actor"], created["role"], created["outcome"], created["status"], created["client"],
            created["action"], sorted(created["backends"])) == (
        admin.split("_")[1], "admin", "ok", 202, "10.1.2.3", "jobs.create", ["archive", "local"])
    denied = next(e for e in entries if e["actor"] == viewer.split("_")[1] and e["outcome"] == "denied")
    assert denied["status"] == 403 and "operate" in denied["detail"]
    assert any(e["outcome"] == "unauthenticated" and e["path"] == "/v1/policies/whatever" for e in entries)
    assert any(e["outcome"] == "unauthenticated" and e["method"] == "GET" for e in entries)  # refused reads too
    # Filters
    mine = call(app, admin, "GET", "/v1/audit", query_string={"actor": viewer.split("_")[1]}).get_json()["entries"]
    assert mine and all(e["actor"] == viewer.split("_")[1] for e in mine)
    by_backend = call(app, admin, "GET", "/v1/audit", query_string={"backend": "archive"}).get_json()["entries"]
    assert by_backend and all("archive" in e["backends"] for e in by_backend)
    assert call(app, viewer, "GET", "/v1/audit").status_code == 403
    # Append-only: the database itself refuses to change or remove an entry.
    for statement in ("UPDATE audit_log SET outcome = 'ok'", "DELETE FROM audit_log"):
        with pytest.raises(Exception, match="append-only"):
            with transaction() as session:
                session.execute(text(statement))
    with transaction() as session:
        assert session.scalars(select(AuditEntry).where(AuditEntry.job_id == job_id)).first() is not None


def test_key_files_must_be_private(tmp_path):
    path = tmp_path / "admin.key"
    write_key_file(path, "fy_abc_def")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert read_key_file(path) == "fy_abc_def"
    assert read_key_file(tmp_path / "absent") is None
    path.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        read_key_file(path)
    with pytest.raises(FileExistsError):  # never overwritten in place
        write_key_file(path, "fy_other_key")


def test_policy_documents_grant_what_they_place(app):
    key = make_key(Role.operator, ["write:local", "write:mirror"])  # the hot tier: local, mirror
    hot = {"name": f"{PREFIX}-hot", "selector": {"prefix": f"{PREFIX}-hot/"},
           "placement": {"backends": "tier=hot", "replicas": 2}, "schedule": "manual"}
    assert call(app, key, "POST", "/v1/policies", json={"yaml": yaml.safe_dump(hot)}).status_code == 201
    cold = {**hot, "name": f"{PREFIX}-cold", "placement": {"backends": "tier=cold", "replicas": 1}}
    r = call(app, key, "POST", "/v1/policies", json={"yaml": yaml.safe_dump(cold)})
    assert r.status_code == 403 and r.get_json()["error"]["details"]["missing"].startswith("write:")
    retention = {**hot, "name": f"{PREFIX}-ret", "retention": {"delete_after": "30d"}}  # deletes anywhere
    assert call(app, key, "POST", "/v1/policies", json={"yaml": yaml.safe_dump(retention)}).status_code == 403


@pytest.fixture
def tight_limits(monkeypatch):
    from ferry import security

    monkeypatch.setenv("FERRY_RATE_LIMIT", "5/minute")
    monkeypatch.setenv("FERRY_AUTH_FAILURE_LIMIT", "3/minute")
    get_settings.cache_clear()
    security.rate_limits.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()
    security.rate_limits.cache_clear()


RACE = """
import threading
from ferry.security import RateLimits
errors, start = [], threading.Barrier(8)
def build():
    start.wait()
    try:
        RateLimits({url!r}, "10/second", "10/second")
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=build) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(errors)
assert not errors
"""


def test_rate_limits_built_by_threads_at_once_in_a_new_process(tmp_path):
    """The first requests of a threaded API process build the limiter together; `limits`
    imports redis then and read a half-imported module (500s, before the fix: 7 of 8)."""
    import subprocess
    import sys

    script = tmp_path / "race.py"
    script.write_text(RACE.format(url=get_settings().broker))
    for _ in range(2):
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr


def test_rate_limits_per_key_in_redis_answer_429_with_retry_after(app, tight_limits):
    from ferry import security

    assert get_settings().broker.startswith("redis://")  # counted in the shared Redis, not per process
    assert "Redis" in type(security.rate_limits().limiter.storage).__name__
    busy, calm = make_key(Role.viewer), make_key(Role.viewer)
    assert [call(app, busy, "GET", "/v1/jobs").status_code for _ in range(5)] == [200] * 5
    r = call(app, busy, "GET", "/v1/jobs")
    assert r.status_code == 429 and r.get_json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert call(app, calm, "GET", "/v1/jobs").status_code == 200  # per key: another key is not slowed
    # Guessing keys from one address: refused outright once over the limit.
    address = {"REMOTE_ADDR": "192.0.2.77"}
    codes = [call(app, f"fy_guess{i}_x", "GET", "/v1/jobs", environ_base=address).status_code for i in range(4)]
    assert codes == [401, 401, 401, 429]
    assert call(app, calm, "GET", "/v1/jobs", environ_base=address).status_code == 200  # a good key still works


def fake_dns(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        if host in table:
            return table[host]
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            raise OSError("unknown host") from None
    return resolve


@pytest.mark.parametrize(("url", "allow", "reason"), [
    ("http://169.254.169.254/latest/meta-data/", ["0.0.0.0/0"], "metadata"),
    ("http://[fd00:ec2::254]/", ["::/0"], "metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", ["*"], "metadata"),
    ("http://rebind.example/", ["*.example"], "metadata"),      # allowed by name, resolves to metadata
    ("http://10.0.0.5:9000/", [], "not in FERRY_ENDPOINT_ALLOWLIST"),
    ("http://10.0.0.5:9000/", ["10.1.0.0/16"], "not in FERRY_ENDPOINT_ALLOWLIST"),
    ("http://127.0.0.1:5001/", ["*.internal"], "not in FERRY_ENDPOINT_ALLOWLIST"),
    ("http://evil.example/", ["minio.internal"], "not in FERRY_ENDPOINT_ALLOWLIST"),
    ("file:///etc/passwd", ["*"], "only http"),
    ("gopher://minio.internal/", ["*"], "only http"),
    ("http://user:pw@minio.internal/", ["*"], "credentials in a URL"),
    ("http://nowhere.invalid/", ["*"], "does not resolve"),
    ("http://[::1/", ["*"], "not a URL"),
])
def test_endpoints_outside_the_allowlist_are_refused(url, allow, reason):
    from ferry.security import EndpointRefused, check_endpoint

    dns = fake_dns({"rebind.example": ["169.254.169.254"], "evil.example": ["10.0.0.9"],
                    "minio.internal": ["10.0.0.7"]})
    with pytest.raises(EndpointRefused, match=reason):
        check_endpoint(url, allow, resolve=dns)


@pytest.mark.parametrize(("url", "allow"), [
    ("http://minio.internal:9000/", ["minio.internal"]),
    ("https://s3.eu-west-1.amazonaws.com/", ["*.amazonaws.com"]),
    ("http://10.0.0.5:9000/", ["10.0.0.0/8"]),
    ("http://127.0.0.1:5001/", ["127.0.0.1/32"]),
])
def test_allowlisted_endpoints_pass(url, allow):
    from ferry.security import check_endpoint

    check_endpoint(url, allow, resolve=fake_dns({"minio.internal": ["10.0.0.7"],
                                                 "s3.eu-west-1.amazonaws.com": ["52.95.1.1"]}))


def test_backend_check_connects_only_to_allowlisted_endpoints(app, keys, s3_server, monkeypatch):
    admin = keys["admin"]
    body = {"name": "candidate", "driver": "s3", "settings": {
        "bucket": "ferry-e2e", "endpoint_url": s3_server, "create_bucket": True,
        "access_key_id": {"env": "AWS_ACCESS_KEY_ID"}, "secret_access_key": {"env": "AWS_SECRET_ACCESS_KEY"}}}
    r = call(app, admin, "POST", "/v1/backends/check", json=body)  # nothing allow-listed by default
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "endpoint_refused"
    assert r.get_json()["error"]["field"] == "settings.endpoint_url"
    monkeypatch.setenv("FERRY_ENDPOINT_ALLOWLIST", '["127.0.0.1/32"]')
    get_settings.cache_clear()
    try:
        r = call(app, admin, "POST", "/v1/backends/check", json=body)
        assert r.status_code == 200 and r.get_json()["ok"] is True, r.get_json()
        down = {**body, "settings": {**body["settings"], "endpoint_url": "http://127.0.0.1:9",
                                     "connect_timeout": 0.5, "max_attempts": 1}}
        r = call(app, admin, "POST", "/v1/backends/check", json=down)
        assert r.status_code == 200 and r.get_json()["ok"] is False and r.get_json()["error"]
        meta = {**body, "settings": {**body["settings"], "endpoint_url": "http://169.254.169.254"}}
        r = call(app, admin, "POST", "/v1/backends/check", json=meta)
        assert r.status_code == 422 and "metadata" in r.get_json()["error"]["message"]
        gw = {"driver": "gateway", "settings": {"gateways": ["http://127.0.0.1:9", "http://10.9.9.9"]}}
        r = call(app, admin, "POST", "/v1/backends/check", json=gw)
        assert r.status_code == 422 and r.get_json()["error"]["field"] == "settings.gateways[1]"
        clear = {**body, "settings": {**body["settings"], "secret_access_key": "hunter2"}}
        r = call(app, admin, "POST", "/v1/backends/check", json=clear)
        assert r.status_code == 422 and "hunter2" not in r.get_data(as_text=True)
        local = {"driver": "local", "settings": {"root": "/etc"}}
        assert call(app, admin, "POST", "/v1/backends/check", json=local).status_code == 422
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
