"""Secrets never leak: backend credentials come only from the environment or secret files,
and neither they nor API keys appear in any API response, process log or catalog table.

The run uses secrets of its own, random and long (so a hit cannot be a coincidence): S3
credentials (one from the environment, one from a file) for a bucket on the S3 peer, and an
IPFS RPC Authorization header for a node that is down (so its failure is logged). Jobs run
that use them, succeed and fail; then every response body and header, every log line of
the API, worker and beat, and every row of every table is searched for each secret.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import MetaData, select

from ferry.catalog.db import engine, transaction
from ferry.catalog.models import Role
from ferry.security import create_key
from ferry.settings import get_settings
from tests.fixtures.cluster import Cluster, auth, running_cluster, wait_job

pytestmark = pytest.mark.e2e

SECRETS = {
    "s3 key id": "AKIA" + secrets.token_hex(8).upper(),
    "s3 secret": secrets.token_urlsafe(30),
    "ipfs auth": "Bearer " + secrets.token_urlsafe(24),
}


@pytest.fixture(scope="module")
def cluster(test_env, s3_backend, s3_server, tmp_path_factory) -> Iterator[Cluster]:
    secret_file = tmp_path_factory.mktemp("secrets") / "s3_secret"
    secret_file.write_text(SECRETS["s3 secret"])
    secret_file.chmod(0o600)
    path = Path(test_env["tmp"]) / "backends-secrets.yaml"
    backends = yaml.safe_load(Path(os.environ["FERRY_BACKENDS_FILE"]).read_text())["backends"]
    backends += [
        {"name": "s3-secret", "driver": "s3", "labels": {"tier": "vault"},
         "settings": {"bucket": "ferry-secrets", "endpoint_url": s3_server, "create_bucket": True,
                      "access_key_id": {"env": "FERRY_TEST_S3_KEY_ID"},
                      "secret_access_key": {"file": str(secret_file)}}},
        {"name": "ipfs-secret", "driver": "ipfs", "labels": {"tier": "vault"},
         "settings": {"api_url": "http://127.0.0.1:9", "timeout": 2, "auth": {"env": "FERRY_TEST_IPFS_AUTH"}}},
    ]
    path.write_text(yaml.safe_dump({"backends": backends}))
    env = {"FERRY_TEST_S3_KEY_ID": SECRETS["s3 key id"], "FERRY_TEST_IPFS_AUTH": SECRETS["ipfs auth"],
           "FERRY_MAX_ATTEMPTS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERRY_BACKENDS_FILE", str(path))
        get_settings.cache_clear()
        with running_cluster(test_env, "secrets", env) as c:
            yield c
    get_settings.cache_clear()


def test_no_secret_in_responses_logs_or_the_catalog(cluster, disks):
    with transaction() as session:
        _, operator_key = create_key(session, name="secrets test", role=Role.operator,
                                     grants=[{"backends": "*", "access": "write"}])
    every_secret = {**SECRETS, "admin API key": os.environ["FERRY_API_KEY"], "operator API key": operator_key}
    seen: list[str] = []

    (disks / "local" / "sec").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (disks / "local" / "sec" / f"{i}.bin").write_bytes(os.urandom(1000 + i))
    with httpx.Client(base_url=cluster.api_url, headers=auth(operator_key), timeout=60) as api:
        def get(path: str, **kw) -> httpx.Response:
            r = api.get(path, **kw)
            seen.append(f"{r.status_code} {r.headers} {r.text}")
            return r

        def post(path: str, body: dict) -> httpx.Response:
            r = api.post(path, json=body)
            seen.append(f"{r.status_code} {r.headers} {r.text}")
            return r

        ok = post("/v1/jobs", {"kind": "replicate", "source": {"backend": "local", "prefix": "sec/"},
                               "targets": [{"backend": "s3-secret"}]})
        down = post("/v1/jobs", {"kind": "replicate", "source": {"backend": "local", "prefix": "sec/"},
                                 "targets": [{"backend": "ipfs-secret"}]})
        assert wait_job(api, ok.json()["id"])["state"] == "succeeded"  # the secrets were really used
        assert wait_job(api, down.json()["id"])["state"] == "failed"
        verify = post("/v1/jobs", {"kind": "verify", "source": {"backend": "s3-secret", "prefix": ""}})
        assert wait_job(api, verify.json()["id"])["state"] == "succeeded"
        for job in (ok, down, verify):
            get(f"/v1/jobs/{job.json()['id']}")
            get(f"/v1/jobs/{job.json()['id']}/items")
        backends = get("/v1/backends").json()["backends"]
        shown = next(b for b in backends if b["name"] == "s3-secret")["settings"]
        assert shown["access_key_id"] == {"env": "FERRY_TEST_S3_KEY_ID"} and "file" in shown["secret_access_key"]
        for path in ("/v1/events", "/v1/openapi.json", "/metrics", "/v1/jobs"):
            get(path)
        post("/v1/jobs", {"kind": "replicate", "source": {"backend": "s3-secret", "keys": ["nope/../x"]},
                          "targets": [{"backend": "archive"}]})  # an error answer too
    with httpx.Client(base_url=cluster.api_url, headers=auth(), timeout=60) as admin:
        r = admin.get("/v1/audit", params={"limit": 1000})
        seen.append(r.text)
        r = admin.get("/v1/keys")
        seen.append(r.text)

    logs = {p.name: p.read_text(errors="replace") for p in cluster.log_dir.glob("*.log")}
    assert "ipfs-secret" in logs["w1.log"] or "127.0.0.1:9" in logs["w1.log"]  # the failure was logged
    tables = []
    with engine().connect() as conn:
        meta = MetaData()
        meta.reflect(conn)
        for table in meta.sorted_tables:
            tables.append(f"{table.name}: {conn.execute(select(table)).all()}")
    places = {"responses": "\n".join(seen), **logs, "catalog": "\n".join(tables)}
    # The search finds what is there: the key's public prefix is in the audit log.
    assert operator_key.split("_")[1] in places["responses"] and "s3-secret" in places["catalog"]
    leaks = [(what, where) for what, value in every_secret.items() for where, text in places.items() if value in text]
    assert leaks == [], f"secrets found: {leaks}"
