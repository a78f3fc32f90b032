"""Test session set-up: a fresh Postgres database, a Redis database and a backends file.

The suite runs against real services (see README, "Tests"): Postgres on
127.0.0.1:5432 and Redis on 127.0.0.1:6379, overridable with FERRY_TEST_POSTGRES
(an admin URL) and FERRY_TEST_REDIS. A missing service fails the run with the
command that starts it; nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

pytest_plugins = ["tests.fixtures.s3peer", "tests.fixtures.cluster", "tests.fixtures.ipfsnode", "tests.fixtures.gateway",
                  "tests.fixtures.filecoin_sim", "tests.fixtures.hubpeer"]

ADMIN_URL = os.environ.get("FERRY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("FERRY_TEST_REDIS", "redis://127.0.0.1:6379")
_state: dict = {}


def _admin_connect():
    import psycopg

    try:
        return psycopg.connect(ADMIN_URL.replace("postgresql+psycopg", "postgresql"), autocommit=True,
                               connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.exit(f"Postgres is not reachable at {ADMIN_URL} ({exc}); start it with "
                    "`pg_ctlcluster $(ls /etc/postgresql) main start` or run .ci/run", returncode=3)


# Redis dbs for test sessions (the benches take 11-14 and 0). A session claims one with a
# key (SET NX, expiring), so sessions running side by side never share a broker: one would
# flush the other's queues and take its tasks.
TEST_REDIS_DBS = range(1, 11)
CLAIM_KEY = "ferry:test-session"


def _claim_redis_db() -> str:
    import redis

    start = os.getpid() % len(TEST_REDIS_DBS)
    for i in range(len(TEST_REDIS_DBS)):
        url = f"{REDIS_BASE}/{TEST_REDIS_DBS[(start + i) % len(TEST_REDIS_DBS)]}"
        r = redis.Redis.from_url(url, socket_timeout=5)
        if r.set(CLAIM_KEY, os.getpid(), nx=True, ex=3 * 3600):
            for key in r.scan_iter(count=1000):  # a crashed session's leftovers
                if key != CLAIM_KEY.encode():
                    r.delete(key)
            return url
    raise redis.RedisError(f"every test Redis db ({TEST_REDIS_DBS.start}-{TEST_REDIS_DBS.stop - 1}) is claimed by a "
                           f"running session ({CLAIM_KEY})")


def pytest_configure(config: pytest.Config) -> None:
    import redis

    tmp = Path(tempfile.mkdtemp(prefix="ferry-test-"))
    dbname = f"ferry_test_{os.getpid()}"
    with _admin_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
        conn.execute(f'CREATE DATABASE "{dbname}"')
    try:
        broker = _claim_redis_db()
    except redis.RedisError as exc:
        pytest.exit(f"Redis is not reachable at {broker} ({exc}); start it with redis-server "
                    "(see README) or run .ci/run", returncode=3)
    db_url = ADMIN_URL.rsplit("/", 1)[0] + f"/{dbname}"
    backends_file = tmp / "backends.yaml"
    write_backends(backends_file, tmp / "disks")
    os.environ.update({
        "FERRY_DATA_DIR": str(tmp / "data"),
        "FERRY_DATABASE_URL": db_url,
        "FERRY_BROKER_URL": broker,
        "FERRY_BACKENDS_FILE": str(backends_file),
        # Tests call fast and fail authentication on purpose; test_security checks the limits.
        "FERRY_RATE_LIMIT": "100000/minute",
        "FERRY_AUTH_FAILURE_LIMIT": "100000/minute",
    })
    _state.update(tmp=tmp, dbname=dbname, db_url=db_url, broker=broker)

    from ferry.catalog.migrate import upgrade
    from ferry.settings import get_settings

    get_settings.cache_clear()
    upgrade()
    # The session's admin key: the `api` clients send it, and CLI subprocesses find it in
    # FERRY_API_KEY. Tests of roles and grants make their own keys.
    from ferry.catalog.db import transaction
    from ferry.catalog.models import Role
    from ferry.security import create_key

    with transaction() as session:
        _, key = create_key(session, name="test session admin", role=Role.admin)
    os.environ["FERRY_API_KEY"] = key
    _state["admin_key"] = key


def _sync_backends() -> None:
    from ferry.catalog.db import transaction
    from ferry.catalog.replicas import sync_backends
    from ferry.settings import get_settings

    with transaction() as session:
        sync_backends(session, get_settings().backends())


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _state:
        return
    from ferry.catalog.db import engine_for

    engine_for(_state["db_url"]).dispose()
    try:
        import redis

        redis.Redis.from_url(_state["broker"], socket_timeout=5).flushdb()  # the claim goes with it
    except Exception as exc:  # the claim expires by itself
        print(f"could not release the test Redis db {_state['broker']}: {exc}")
    with _admin_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{_state["dbname"]}" WITH (FORCE)')
    if os.environ.get("FERRY_KEEP_TEST_DIR"):  # keep process logs and disks for a post-mortem
        print(f"\ntest files kept in {_state['tmp']}")
    else:
        shutil.rmtree(_state["tmp"], ignore_errors=True)


def write_backends(path: Path, disks: Path, s3_endpoint: str | None = None, bucket: str | None = None) -> None:
    backends = [
        {"name": "local", "driver": "local", "labels": {"tier": "hot", "zone": "a"},
         "settings": {"root": str(disks / "local")}},
        # A second hot disk in another failure domain, for placement spread over zones.
        {"name": "mirror", "driver": "local", "labels": {"tier": "hot", "zone": "b"},
         "settings": {"root": str(disks / "mirror")}},
        {"name": "archive", "driver": "local", "labels": {"tier": "cold"},
         "settings": {"root": str(disks / "archive")}},
    ]
    if s3_endpoint:
        backends.append({
            "name": "s3", "driver": "s3", "labels": {"tier": "cold", "region": "local"},
            "settings": {"bucket": bucket, "endpoint_url": s3_endpoint, "create_bucket": True,
                         "access_key_id": {"env": "AWS_ACCESS_KEY_ID"},
                         "secret_access_key": {"env": "AWS_SECRET_ACCESS_KEY"},
                         "multipart_threshold": 8 * 2**20, "part_size": 5 * 2**20},
        })
        # An S3 backend whose service is down: nothing listens on port 9.
        backends.append({
            "name": "s3-down", "driver": "s3", "labels": {"tier": "broken"},
            "settings": {"bucket": "nowhere", "endpoint_url": "http://127.0.0.1:9",
                         "access_key_id": {"env": "AWS_ACCESS_KEY_ID"},
                         "secret_access_key": {"env": "AWS_SECRET_ACCESS_KEY"},
                         "connect_timeout": 0.5, "read_timeout": 1, "max_attempts": 1},
        })
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(yaml.safe_dump({"backends": backends}))
    tmp_path.replace(path)


@pytest.fixture(scope="session")
def test_env() -> dict:
    """Paths and URLs of this test session."""
    return dict(_state)


@pytest.fixture(scope="session")
def disks(test_env) -> Path:
    return test_env["tmp"] / "disks"


@pytest.fixture(scope="session", autouse=True)
def s3_backend(s3_server, disks, test_env) -> str:
    """Adds an `s3` backend (a bucket on the moto peer) to the session's backends file."""
    write_backends(Path(os.environ["FERRY_BACKENDS_FILE"]), disks, s3_server, "ferry-e2e")
    _sync_backends()
    return "s3"
