"""OpenAPI-driven fuzzing of the live API (schemathesis), as each role.

schemathesis generates requests from the OpenAPI document and sends them over HTTP to the
gunicorn API of the `cluster` fixture, with the key of each role in turn: an admin, an
operator granted write on every backend, an operator granted nothing and a viewer granted
read on every backend. Every operation gets schemathesis's coverage cases (boundary and
invalid values derived from the schema), its examples and up to MAX_EXAMPLES fuzzed cases,
valid and invalid. Every answer must be no server error, have a documented status code and
content type, and match its documented schema (errors: the one ErrorBody shape).

Random names almost never name something that exists, so each role has a small world of
its own (an object with a verified replica, a verify job, a policy, a key to revoke) and
about half of the cases with path parameters name it instead; request bodies get examples
that name real backends. Generation is derandomized: a run is reproducible. The number of
cases sent per role is printed by `test_every_role_was_fuzzed`.

`test_found` then replays, one by one, the requests that broke the API when they were found.
"""

from __future__ import annotations

import copy
import os
import zlib
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import requests
import schemathesis
from schemathesis import checks as st_checks

from api import (  # noqa: F401  (register)
    access,
    backends,
    deals,
    events,
    health,
    jobs,
    metrics,
    objects,
    openapi,
    policies,
    search,
)
from api.schemas import ErrorBody
from ferry.catalog.db import transaction
from ferry.catalog.models import Replica, ReplicaState, Role, StoredObject, utcnow
from ferry.security import create_key
from ferry.settings import get_settings
from tests.fixtures.cluster import auth, filecoin_cluster, wait_job
from workers.cid import digest_bytes

pytestmark = pytest.mark.e2e

# Fuzzed cases per operation and role, on top of the coverage and example cases; raise it
# for a deeper run (FERRY_FUZZ_EXAMPLES=500), the suite keeps it small (the coverage phase
# alone sends most of the cases).
MAX_EXAMPLES = int(os.environ.get("FERRY_FUZZ_EXAMPLES", "15"))
# Least privileged first, in each operation's run.
ROLES = {
    "viewer": (Role.viewer, [{"backends": "*", "access": "read"}]),
    "operator-ungranted": (Role.operator, []),
    "operator": (Role.operator, [{"backends": "*", "access": "write"}]),
    "admin": (Role.admin, []),
}
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_schema_conformance]
MIN_CASES_PER_ROLE = 1000

SHARED_KEY = "fuzz/shared.bin"  # an object every role's job and policy examples name
BODY_EXAMPLES = {
    "JobCreate": {"kind": "replicate", "source": {"backend": "local", "keys": [SHARED_KEY]},
                  "targets": [{"backend": "archive", "prefix": "fuzz-copies/"}], "tags": ["fuzz"]},
    "PolicyApply": {"document": {"name": "fuzz-applied", "selector": {"prefix": "fuzz-none/"},
                                 "placement": {"backends": "tier=hot", "replicas": 1}, "schedule": "manual"}},
    "KeyCreate": {"name": "made by the fuzzer", "role": "viewer", "grants": [{"backends": "local", "access": "read"}]},
    "ObjectLabels": {"add_tags": ["fuzz"], "metadata": {"fuzzed": True}, "media_type": "text/plain"},
    "HoldUpdate": {"hold": False},
    "QuoteRequest": {"source": {"backend": "local", "prefix": "fuzz-"}, "backend": "filecoin", "deal": {"copies": 1}},
    "ProviderIn": {"id": "f0999", "region": "fuzz", "price": 1, "verified_price": 0},
    "SearchRequest": {"query": "fuzz shared object", "mode": "text", "filters": {"tags": ["fuzz"]}, "limit": 5},
    "DealScheduleIn": {"name": "fuzz-made", "source": {"backend": "local", "prefix": "fuzz-none/"},
                       "backend": "filecoin", "schedule": {"every": "1h"}, "deals_per_run": 1, "paused": True},
}
# What the worlds hold for deals: a provider that takes them (the simulation's f01000), a
# paused schedule named like each role's policy.
PROVIDER = {"id": "f01000", "region": "sim", "price": 100000000, "verified_price": 0}
SCHEDULE = {"source": {"backend": "local", "prefix": "fuzz-none/"}, "backend": "filecoin",
            "schedule": {"every": "1h"}, "deals_per_run": 1, "paused": True}


def fuzzed_spec() -> dict:
    """The document the API publishes (made by the same code), request bodies given examples."""
    spec = copy.deepcopy(openapi.spec(ErrorBody))
    for operations in spec["paths"].values():
        for op in operations.values():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            model = body["schema"].get("$ref", "").rsplit("/", 1)[-1] if body else None
            if model in BODY_EXAMPLES:  # an operation added since is fuzzed all the same, without one
                body["example"] = BODY_EXAMPLES[model]
    return spec


schema = schemathesis.openapi.from_dict(fuzzed_spec(), config=schemathesis.Config.from_dict({
    "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"examples": {"fill-missing": True}},
}))

# Answers, by role and (operation, method sent, status code): the coverage phase also sends
# methods an operation does not have.
tally: dict[str, Counter] = {role: Counter() for role in ROLES}


@pytest.fixture(scope="module")
def cluster(test_env, filecoin_sim, s3_backend) -> Iterator:
    """The API, a worker and beat with a filecoin backend on the simulation, so that the
    deal operations have deals, schedules and pieces to name."""
    with filecoin_cluster(test_env, filecoin_sim, "fuzz", env={"FERRY_MAX_ATTEMPTS": "3"}) as c:
        yield c


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    out = {}
    with transaction() as session:
        for role, (role_enum, grants) in ROLES.items():
            _, out[role] = create_key(session, name=f"fuzz {role}", role=role_enum, grants=grants)
    return out


def put_object(key: str, data: bytes) -> str:
    """An object with a verified replica on `local`; its CID."""
    d = digest_bytes(data)
    path = os.path.join(get_settings().backends()["local"].settings["root"], key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    with transaction() as session:
        obj = StoredObject(cid=d.cid, sha256=d.sha256, size=d.size, media_type="text/plain")
        session.add(obj)
        session.flush()
        session.add(Replica(object_id=obj.id, backend="local", key=key, state=ReplicaState.present,
                            verified_at=utcnow()))
    return d.cid


@pytest.fixture(scope="module")
def worlds(cluster, filecoin_sim) -> dict[str, dict[str, str]]:
    """Per role, what its path parameters may name: an object, a job, a policy, a key; and a
    second policy and object for DELETE, so that the others still find theirs."""
    put_object(SHARED_KEY, b"shared by the fuzzed roles\n" * 50)
    out = {}
    filecoin_sim.reset()
    filecoin_sim.configure_defaults()  # f01000 takes deals
    with httpx.Client(base_url=cluster.api_url, headers=auth(), timeout=60) as api:
        assert api.put("/v1/providers", json=PROVIDER).status_code == 200
        for role in ROLES:
            cid = put_object(f"fuzz-{role}/obj", f"fuzzed as {role}\n".encode() * 100)
            doomed_cid = put_object(f"fuzz-{role}/doomed", f"deleted as {role}\n".encode() * 100)
            r = api.post("/v1/jobs", json={"kind": "verify", "source": {"backend": "local",
                                                                         "keys": [f"fuzz-{role}/obj"]}})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            assert wait_job(api, job_id, timeout=60)["state"] == "succeeded"
            for name in (f"fuzz-{role}", f"fuzz-{role}-doomed"):
                policy = {"name": name, "selector": {"prefix": f"{name}-none/"},
                          "placement": {"backends": "tier=hot", "replicas": 1}, "schedule": "manual"}
                r = api.post("/v1/policies", json={"document": policy})
                assert r.status_code == 201, r.text
            for name in (f"fuzz-{role}", f"fuzz-{role}-doomed"):  # deal schedules by the same names
                r = api.put("/v1/deal-schedules", json={**SCHEDULE, "name": name})
                assert r.status_code == 200, r.text
            r = api.post("/v1/jobs", json={"kind": "deal", "source": {"backend": "local", "keys": [f"fuzz-{role}/obj"]},
                                           "targets": [{"backend": "filecoin"}], "deal": {"copies": 1}})
            assert r.status_code == 202, r.text
            assert wait_job(api, r.json()["id"], timeout=60)["state"] == "succeeded"
            deal = api.get("/v1/deals", params={"job_id": r.json()["id"]}).json()["deals"][0]
            r = api.post("/v1/keys", json={"name": f"fuzz {role} revocable", "role": "viewer"})
            assert r.status_code == 201, r.text
            out[role] = {"cid": cid, "job_id": job_id, "name": f"fuzz-{role}", "prefix": r.json()["prefix"],
                         "doomed": f"fuzz-{role}-doomed", "deal_id": deal["id"], "piece_cid": deal["piece_cid"],
                         "provider_id": PROVIDER["id"], "doomed_cid": doomed_cid}
    return out


@pytest.fixture(scope="module")
def live(cluster) -> Iterator[tuple[str, requests.Session]]:
    """The live API's URL and a session to it; the API publishes the document fuzzed here."""
    published = httpx.get(f"{cluster.api_url}/v1/openapi.json", headers=auth(), timeout=30)
    assert published.status_code == 200, published.text
    assert published.json() == openapi.spec(ErrorBody)
    with requests.Session() as session:
        yield cluster.api_url, session


# An event stream lasts `max_seconds` (an hour unless told): each fuzzed one ends after one
# look at the catalog, unless its value is one the API refuses at once (a 422).
STREAM = "GET /v1/events/stream"


def bounded(case):
    if case.operation.label != STREAM:
        return case
    value = case.query.get("max_seconds")
    value = value[0] if isinstance(value, list) and value else value  # a repeated parameter: the first counts
    try:
        refused = value is not None and not 0 <= float(value) <= 3600
    except (TypeError, ValueError):
        refused = True
    return case if refused else case.derive(query={**case.query, "max_seconds": 0})


def names_what_exists(case) -> bool:
    """About half the cases, chosen by their generated path parameters (so a replay agrees)."""
    return zlib.crc32(repr(sorted(case.path_parameters.items())).encode()) % 2 == 0


@pytest.mark.parametrize("role", list(ROLES))
@schema.parametrize()
def test_fuzz(case, role, keys, worlds, live):
    base_url, session = live
    if case.path_parameters and names_what_exists(case):
        existing = worlds[role]
        if case.operation.label in ("DELETE /v1/policies/{name}", "DELETE /v1/deal-schedules/{name}"):
            existing = {**existing, "name": existing["doomed"]}
        if case.operation.label == "DELETE /v1/objects/{cid}":
            existing = {**existing, "cid": existing["doomed_cid"]}
        case = case.derive()  # the schema's explicit cases are shared by the roles: left as they are
        case.path_parameters = {k: existing.get(k, v) for k, v in case.path_parameters.items()}
    case = bounded(case)
    response = case.call(base_url=base_url, session=session, headers=auth(keys[role]), timeout=60)
    tally[role][case.operation.label, case.method.upper(), response.status_code] += 1
    case.validate_response(response, checks=CHECKS)


def succeeded(counts: Counter) -> set[str]:
    """The operations answered 2xx at least once (to their own method)."""
    return {label for label, method, status in counts if 200 <= status < 300 and label.startswith(f"{method} ")}


def test_every_role_was_fuzzed():
    """Runs after the fuzzing (file order): how many cases each role sent, for the README."""
    lines = []
    for role, counts in tally.items():
        operations = {label for label, _, _ in counts}
        lines.append(f"{role}: {sum(counts.values())} cases over {len(operations)} operations, "
                     f"{len(succeeded(counts))} of them answered 2xx at least once")
    lines.append(f"total: {sum(sum(c.values()) for c in tally.values())} cases")
    print("\n" + "\n".join(lines))
    for role, counts in tally.items():
        assert sum(counts.values()) >= MIN_CASES_PER_ROLE, (role, counts)
    # The admin may do everything: unless the worlds stopped matching, most of its operations
    # did something (some cannot: a finished job's cancel is a 409).
    admin = tally["admin"]
    assert len(succeeded(admin)) >= 0.75 * len({label for label, _, _ in admin}), sorted(admin.items())


# What the fuzzer (or a probe it prompted) found, pinned so that a fix stays fixed whatever
# the generation draws: each is sent once, as the admin, and held to the same checks.
# (operation, the case's parts; "{job_id}" is replaced with the admin's job)
FOUND = {
    # Integers past the column's range reached Postgres: 500.
    "events after past bigint": ("GET /v1/events", {"query": {"after": str(2**70)}}),
    "audit before_id past bigint": ("GET /v1/audit", {"query": {"before_id": str(2**70)}}),
    "items after past integer": ("GET /v1/jobs/{job_id}/items",
                                 {"path_parameters": {"job_id": "{job_id}"}, "query": {"after": str(2**40)}}),
    # NUL in text reached Postgres, which refuses it: 500.
    "NUL in an audit filter": ("GET /v1/audit", {"query": {"actor": "a\x00b"}}),
    "NUL in an events filter": ("GET /v1/events", {"query": {"kind": "a\x00b"}}),
    "NUL in a key name": ("POST /v1/keys", {"body": {"name": "a\x00b", "role": "viewer"}}),
    "NUL in an object's CID": ("GET /v1/objects/{cid}", {"path_parameters": {"cid": "a\x00b"}}),
    "NUL in a policy name": ("GET /v1/policies/{name}", {"path_parameters": {"name": "a\x00b"}}),
    "NUL in a key prefix": ("DELETE /v1/keys/{prefix}", {"path_parameters": {"prefix": "a\x00b"}}),
    # A time without its UTC offset, or one past year 9999 in UTC: 500.
    "naive since": ("GET /v1/audit", {"query": {"since": "2020-01-01T00:00:00"}}),
    "until past year 9999 in UTC": ("GET /v1/audit", {"query": {"until": "9999-12-31T23:59:59-23:59"}}),
    "naive expires_at": ("POST /v1/keys", {"body": {"name": "x", "role": "viewer",
                                                   "expires_at": "2999-01-01T00:00:00"}}),
    # A policy's unset times were left out of the answer, where the schema requires them (null).
    "policy answer with null times": ("POST /v1/policies", {"body": {"document": {
        "name": "fuzz-found", "selector": {"prefix": "fuzz-found-none/"},
        "placement": {"backends": "tier=hot", "replicas": 1}, "schedule": "manual"}}}),
    # A request line longer than gunicorn takes (4094 bytes, 8190 at most): its own HTML 414.
    "overlong request line": ("GET /v1/events", {"query": {"kind": "x" * 9000}}),
    # A malformed header: gunicorn's own HTML 400, now documented on every operation.
    "malformed header": ("GET /v1/keys", {"headers": {"content-length;": ""}}),
}


@pytest.mark.parametrize("found", list(FOUND))
def test_found(found, keys, worlds, live):
    base_url, session = live
    label, parts = FOUND[found]
    method, path = label.split(" ", 1)
    parts = copy.deepcopy(parts)
    for name, value in parts.get("path_parameters", {}).items():
        parts["path_parameters"][name] = value.format(**worlds["admin"])
    case = schema[path][method].Case(**parts)
    response = case.call(base_url=base_url, session=session, headers=auth(keys["admin"]), timeout=60)
    case.validate_response(response, checks=CHECKS)
