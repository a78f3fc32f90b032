"""The API in-process (Flask test client) against the session's Postgres and Redis:
validation, the one error shape, and an OpenAPI document that matches the routes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from api import create_app

SPEC_FILE = Path(__file__).parents[2] / "docs" / "openapi.json"


@pytest.fixture(scope="module")
def app():
    return create_app({"TESTING": True})


def admin_client(app):
    """A test client sending the session's admin key."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {os.environ['FERRY_API_KEY']}"
    return client


@pytest.fixture
def client(app):
    return admin_client(app)


@pytest.fixture(scope="module")
def spec(app):
    return admin_client(app).get("/v1/openapi.json").get_json()


def conforms(spec: dict, path: str, method: str, status: int, body: dict) -> None:
    """Assert `body` matches the schema the spec publishes for this response."""
    response = spec["paths"][path][method]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    Draft202012Validator({**schema, "components": spec["components"]}).validate(body)


def job(**overrides):
    body = {"kind": "replicate", "source": {"backend": "local", "keys": ["a.txt"]},
            "targets": [{"backend": "archive"}]}
    body.update(overrides)
    return body


BAD_REQUESTS = [
    ("unknown source backend", job(source={"backend": "nope", "keys": ["a"]}), 422, "unknown_backend", "source.backend"),
    ("unknown target backend", job(targets=[{"backend": "nope"}]), 422, "unknown_backend", "targets[0].backend"),
    ("empty key list", job(source={"backend": "local", "keys": []}), 422, "invalid_request", "source.keys"),
    ("no keys and no prefix", job(source={"backend": "local"}), 422, "invalid_request", "source"),
    ("both keys and prefix", job(source={"backend": "local", "keys": ["a"], "prefix": "p/"}), 422, "invalid_request", "source"),
    ("dot-dot key", job(source={"backend": "local", "keys": ["ok", "../etc/passwd"]}), 422, "invalid_key", "source.keys[1]"),
    ("absolute key", job(source={"backend": "local", "keys": ["/etc/passwd"]}), 422, "invalid_key", "source.keys[0]"),
    ("dot-dot prefix", job(source={"backend": "local", "prefix": "a/../../"}), 422, "invalid_key", "key"),
    ("dot-dot target prefix", job(targets=[{"backend": "archive", "prefix": "../x/"}]), 422, "invalid_key", "key"),
    ("repeated keys", job(source={"backend": "local", "keys": ["a", "a"]}), 422, "invalid_request", "source.keys"),
    ("unknown field", job(color="red"), 422, "invalid_request", "color"),
    ("unknown kind", job(kind="teleport"), 422, "invalid_request", "kind"),
    ("no targets", job(targets=[]), 422, "invalid_request", "targets"),
    ("migrate to two targets", job(kind="migrate", targets=[{"backend": "archive"}, {"backend": "s3"}]), 422, "invalid_request", "targets"),
    ("target is the source", job(source={"backend": "local", "prefix": "p/"}, targets=[{"backend": "local", "prefix": "p/"}]), 422, "invalid_request", "targets[0]"),
    ("same target twice", job(targets=[{"backend": "archive"}, {"backend": "archive", "prefix": "x/"}]), 422, "invalid_request", "targets[1].backend"),
    ("keys not a list", job(source={"backend": "local", "keys": "a.txt"}), 422, "invalid_request", "source.keys"),
    ("verify with targets", job(kind="verify"), 422, "invalid_request", "targets"),
    ("verify with tags", job(kind="verify", targets=[], tags=["x"]), 422, "invalid_request", "tags"),
    ("sample on a copy", job(sample=10), 422, "invalid_request", "sample"),
    ("sample over 100", job(kind="verify", targets=[], sample=150), 422, "invalid_request", "sample"),
    ("keep_source on verify", job(kind="verify", targets=[], keep_source=True), 422, "invalid_request", "keep_source"),
]


def test_a_verify_sample_is_stable_and_about_its_size():
    from ferry.catalog.models import JobKind
    from tasks.jobs import JobRequest

    keys = [f"k/{i}" for i in range(20_000)]
    ten = JobRequest(kind=JobKind.verify, source_backend="local", targets=[], prefix="k/", sample=10)
    chosen = [k for k in keys if ten.sampled(k)]
    assert 1800 < len(chosen) < 2200
    assert chosen == [k for k in keys if ten.sampled(k)]  # the same keys every time
    fifty = JobRequest(kind=JobKind.verify, source_backend="local", targets=[], prefix="k/", sample=50)
    assert set(chosen) <= {k for k in keys if fifty.sampled(k)}  # and within every larger sample


@pytest.mark.parametrize("name,body,status,code,field", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_job_requests_get_4xx_with_field_and_reason(client, spec, name, body, status, code, field):
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == status, r.get_json()
    err = r.get_json()["error"]
    assert err["code"] == code
    assert err["field"] == field
    assert err["message"]
    conforms(spec, "/v1/jobs", "post", status, r.get_json())


@pytest.mark.parametrize("data,content_type", [
    (b"{not json", "application/json"),
    (b"", "application/json"),
    (b"[1, 2]", "application/json"),
    (b"\xff\xfe", "application/json"),
    (b'"a string"', "text/plain"),
])
def test_malformed_bodies_get_400(client, data, content_type):
    r = client.post("/v1/jobs", data=data, content_type=content_type)
    assert r.status_code == 400
    assert r.get_json()["error"]["code"] == "malformed_json"


def test_too_large_body_gets_413(client):
    r = client.post("/v1/jobs", data=b"x" * (33 * 2**20), content_type="application/json")
    assert r.status_code == 413
    assert r.get_json()["error"]["code"] == "request_entity_too_large"


def test_unknown_job_and_object_get_404(client, spec):
    for path in ("/v1/jobs/8a1e6c7e-1d6b-4b43-9a51-1a2b3c4d5e6f", "/v1/jobs/not-a-uuid",
                 "/v1/jobs/not-a-uuid/items", "/v1/objects/bafkreinothere"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.get_json()["error"]["code"] in ("job_not_found", "object_not_found")
    r = client.post("/v1/jobs/8a1e6c7e-1d6b-4b43-9a51-1a2b3c4d5e6f/cancel")
    assert r.status_code == 404
    assert client.get("/v1/nothing").get_json()["error"]["code"] == "not_found"


def test_bad_query_parameters_get_422(client):
    accepted = client.post("/v1/jobs", json=job(source={"backend": "local", "keys": ["q.txt"]})).get_json()
    r = client.get(f"/v1/jobs/{accepted['id']}/items?state=exploded")
    assert r.status_code == 422 and r.get_json()["error"]["field"] == "state"
    r = client.get(f"/v1/jobs/{accepted['id']}/items?limit=0")
    assert r.status_code == 422 and r.get_json()["error"]["field"] == "limit"


def test_accepted_job_conforms_and_reads_back(client, spec):
    r = client.post("/v1/jobs", json=job(source={"backend": "local", "keys": ["x/1", "x/2"]},
                                         targets=[{"backend": "archive"}, {"backend": "s3", "prefix": "p/"}]))
    assert r.status_code == 202
    conforms(spec, "/v1/jobs", "post", 202, r.get_json())
    got = client.get(r.get_json()["url"])
    assert got.status_code == 200
    body = got.get_json()
    conforms(spec, "/v1/jobs/{job_id}", "get", 200, body)
    assert body["total"] == 4 and body["items"]["total"] == 4
    assert body["source"] == {"backend": "local", "keys": 2}
    items = client.get(f"/v1/jobs/{body['id']}/items?limit=3").get_json()
    conforms(spec, "/v1/jobs/{job_id}/items", "get", 200, items)
    assert [(i["dest_backend"], i["dest_key"]) for i in items["items"]] == [
        ("archive", "x/1"), ("archive", "x/2"), ("s3", "p/x/1")]
    assert items["next_after"] == 2
    cancelled = client.post(f"/v1/jobs/{body['id']}/cancel")
    assert cancelled.status_code == 200
    conforms(spec, "/v1/jobs/{job_id}/cancel", "post", 200, cancelled.get_json())
    assert cancelled.get_json()["state"] == "cancelled"
    assert client.post(f"/v1/jobs/{body['id']}/cancel").status_code == 409
    listing = client.get("/v1/jobs?limit=5").get_json()
    conforms(spec, "/v1/jobs", "get", 200, listing)


def test_backends_show_references_not_secrets(client, spec):
    body = client.get("/v1/backends").get_json()
    conforms(spec, "/v1/backends", "get", 200, body)
    s3 = next(b for b in body["backends"] if b["name"] == "s3")
    assert s3["settings"]["secret_access_key"] == {"env": "AWS_SECRET_ACCESS_KEY"}
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(body)
    assert s3["queue"] == "backend.s3"


def test_health_and_readiness(client, spec):
    assert client.get("/healthz").get_json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "broker": "ok"}
    conforms(spec, "/readyz", "get", 200, ready.get_json())


def test_openapi_is_valid_and_covers_every_route(app, spec):
    validate(spec)
    routes = {(str(rule), m.lower()) for rule in app.url_map.iter_rules() for m in rule.methods
              if m not in ("HEAD", "OPTIONS") and rule.endpoint != "static"}
    documented = {(path.replace("{", "<").replace("}", ">"), method)
                  for path, ops in spec["paths"].items() for method in ops}
    assert routes - {("/v1/openapi.json", "get")} == documented


def test_published_openapi_file_is_current(spec):
    """docs/openapi.json is what clients download; regenerate with FERRY_WRITE_OPENAPI=1."""
    text = json.dumps(spec, indent=2, sort_keys=True) + "\n"
    if os.environ.get("FERRY_WRITE_OPENAPI"):
        SPEC_FILE.write_text(text)
    assert SPEC_FILE.exists() and SPEC_FILE.read_text() == text, \
        "docs/openapi.json is stale: FERRY_WRITE_OPENAPI=1 pytest tests/unit/test_api.py"


def test_an_interval_policy_runs_at_once_and_a_cron_one_waits(client):
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    try:
        r = client.post("/v1/policies", json={"yaml": "name: every-6h\nverification: {every: 7d}\n"
                                                      "schedule: {every: 6h}\n"})
        assert r.status_code == 201, r.get_json()
        assert datetime.fromisoformat(r.get_json()["next_run_at"]) - now < timedelta(minutes=1)
        r = client.post("/v1/policies", json={"yaml": "name: nightly\nverification: {every: 7d}\n"
                                                      "schedule: {cron: '0 2 * * *'}\n"})
        nxt = datetime.fromisoformat(r.get_json()["next_run_at"])
        assert nxt > now and (nxt.hour, nxt.minute) == (2, 0)
    finally:
        client.delete("/v1/policies/every-6h")
        client.delete("/v1/policies/nightly")


def test_an_unexpected_error_is_500_without_internals():
    app = create_app({"TESTING": True, "PROPAGATE_EXCEPTIONS": False})

    def boom():
        raise RuntimeError("SELECT secret FROM internals WHERE password = 'hunter2'")

    app.add_url_rule("/v1/boom", "boom", boom)
    r = admin_client(app).get("/v1/boom")
    assert r.status_code == 500
    error = r.get_json()["error"]
    assert error["code"] == "internal_error" and "hunter2" not in r.get_data(as_text=True)
    assert "see the API's log" in error["message"]


def test_metrics_gauges_agree_with_the_catalog(client):
    import uuid

    from prometheus_client.parser import text_string_to_metric_families
    from sqlalchemy import func, select

    from ferry.catalog.db import transaction
    from ferry.catalog.models import BROKEN_REPLICA_STATES, Job, Replica, ReplicaState, StoredObject

    with transaction() as s:
        obj = StoredObject(cid=f"bafkgauge{uuid.uuid4().hex}", sha256="a" * 64, size=1)
        s.add(obj)
        s.flush()
        s.add(Replica(object_id=obj.id, backend="archive", key=f"gauge/{obj.cid}", state=ReplicaState.bad))
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    found = {(x.name, frozenset(x.labels.items())): x.value
             for family in text_string_to_metric_families(r.get_data(as_text=True)) for x in family.samples}
    with transaction() as s:
        broken = s.scalar(select(func.count()).select_from(Replica).where(
            Replica.backend == "archive", Replica.state.in_(BROKEN_REPLICA_STATES)))
        jobs = s.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()
    assert found[("ferry_verification_failures", frozenset({("backend", "archive")}))] == broken >= 1
    for kind, state, n in jobs:
        assert found[("ferry_jobs", frozenset({("kind", kind.value), ("state", state.value)}))] == n
    assert found[("ferry_broker_up", frozenset())] == 1
    assert ("ferry_queue_depth", frozenset({("queue", "index"), ("backend", "@search")})) in found
