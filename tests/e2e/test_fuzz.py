"""OpenAPI-driven fuzzing of the live API (schemathesis), as each role.

The spec the running API publishes (/v1/openapi.json) drives schemathesis against the
gunicorn API of the `cluster` fixture over HTTP, once per role: an admin, an operator
granted write on every backend, an operator granted nothing and a viewer granted read on
every backend. Every operation gets schemathesis's coverage cases (boundary and invalid
values, derived from the schema) and up to MAX_EXAMPLES fuzzed ones, positive and negative.
Every response must be no server error, carry a documented status code and content type,
and match its documented schema (errors: the one ErrorBody shape).

Random values almost never name something that exists, so each role gets a small world of
its own (an object with a verified replica, a job, a policy, a key to revoke) whose names
are added to the spec as examples: the examples phase then reaches the 2xx answers too.
The seed is fixed, so a run is reproducible; the number of cases per role is printed.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import requests
import schemathesis
from schemathesis import checks as st_checks

from ferry.catalog.db import transaction
from ferry.catalog.models import Replica, ReplicaState, Role, StoredObject, utcnow
from ferry.security import create_key
from ferry.settings import get_settings
from tests.fixtures.cluster import auth, wait_job
from workers.cid import digest_bytes

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 20  # fuzzed cases per operation and role, on top of the coverage and example cases
SEED = 20240611
# Least privileged first: whatever a role may change, the roles after it are the ones to see it.
ROLES = {
    "viewer": (Role.viewer, [{"backends": "*", "access": "read"}]),
    "operator-ungranted": (Role.operator, []),
    "operator": (Role.operator, [{"backends": "*", "access": "write"}]),
    "admin": (Role.admin, []),
}
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_schema_conformance]
MIN_CASES_PER_ROLE = 500

# Cases sent, by role and by operation.
tally: dict[str, Counter] = {}


@pytest.fixture(scope="module")
def published_spec(cluster) -> dict:
    r = httpx.get(f"{cluster.api_url}/v1/openapi.json", headers=auth(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(params=list(ROLES))
def role(request) -> str:
    return request.param


@pytest.fixture
def role_key(role) -> str:
    role_enum, grants = ROLES[role]
    with transaction() as session:
        _, key = create_key(session, name=f"fuzz {role}", role=role_enum, grants=grants)
    return key


@pytest.fixture
def world(cluster, role) -> dict:
    """What the role's examples name: an object on `local`, a job, a policy, a key to revoke."""
    prefix = f"fuzz-{role}"
    key = f"{prefix}/obj"
    data = f"fuzzed as {role}\n".encode() * 100
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
        revocable, _ = create_key(session, name=f"fuzz {role} revocable", role=Role.viewer)
        revocable_prefix = revocable.prefix
    job = {"kind": "verify", "source": {"backend": "local", "keys": [key]}}
    policy = {"name": prefix, "selector": {"prefix": f"{prefix}-none/"},
              "placement": {"backends": "tier=hot", "replicas": 1}, "schedule": "manual"}
    with httpx.Client(base_url=cluster.api_url, headers=auth(), timeout=60) as api:
        r = api.post("/v1/jobs", json=job)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert wait_job(api, job_id, timeout=60)["state"] == "succeeded"
        r = api.post("/v1/policies", json={"document": policy})
        assert r.status_code in (200, 201), r.text
    return {
        "path": {"cid": d.cid, "job_id": job_id, "name": prefix, "prefix": revocable_prefix},
        "body": {
            "JobCreate": {"kind": "replicate", "source": {"backend": "local", "keys": [key]},
                          "targets": [{"backend": "archive", "prefix": "copies/"}], "tags": ["fuzz"]},
            "PolicyApply": {"document": {**policy, "placement": {"backends": "tier=hot", "replicas": 2}}},
            "KeyCreate": {"name": f"fuzz {role} made", "role": "viewer",
                          "grants": [{"backends": "local", "access": "read"}]},
            "ObjectLabels": {"add_tags": ["fuzz"], "metadata": {"fuzzed": True}, "media_type": "text/plain"},
            "HoldUpdate": {"hold": False},
        },
    }


def with_examples(spec: dict, world: dict) -> dict:
    """The spec, its path parameters and request bodies given the world's names as examples
    (an operation added since this was written is fuzzed all the same, without examples)."""
    spec = copy.deepcopy(spec)
    for operations in spec["paths"].values():
        for op in operations.values():
            for param in op.get("parameters", []):
                if param["in"] == "path" and param["name"] in world["path"]:
                    param["example"] = world["path"][param["name"]]
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            model = body["schema"].get("$ref", "").rsplit("/", 1)[-1] if body else None
            if model in world["body"]:
                body["example"] = world["body"][model]
    return spec


@pytest.fixture
def api_schema(cluster, published_spec, world, role_key):
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
        "base-url": cluster.api_url,
        "request-timeout": 60,
        "auth": {"openapi": {"apiKey": {"bearer": role_key}}},
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
        "phases": {"examples": {"fill-missing": True}, "stateful": {"enabled": False}},
    })
    return schemathesis.openapi.from_dict(with_examples(published_spec, world), config=config)


@pytest.fixture
def http(role) -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_api_as_role(case, role, http):
    response = case.call(session=http)
    tally.setdefault(role, Counter())[case.operation.label] += 1
    case.validate_response(response, checks=CHECKS)


def test_every_role_was_fuzzed():
    """Runs after the fuzzing; prints the number of cases for the README."""
    lines = [f"{role}: {sum(tally.get(role, Counter()).values())} cases" for role in ROLES]
    lines.append(f"total: {sum(sum(c.values()) for c in tally.values())} cases")
    print("\n" + "\n".join(lines))
    for role in ROLES:
        counts = tally.get(role, Counter())
        assert sum(counts.values()) >= MIN_CASES_PER_ROLE, (role, counts)
