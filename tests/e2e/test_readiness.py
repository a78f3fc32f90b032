"""/readyz tells the truth: a broker or database that does not answer makes the API not ready
(503), and it is ready again by itself once they are back."""

from __future__ import annotations

import os
import signal
import time
from urllib.parse import urlsplit

import httpx
import pytest

from ferry.cli import launch
from tests.fixtures.cable import Cable
from tests.fixtures.cluster import Cluster, auth, free_port

pytestmark = pytest.mark.e2e


def test_readyz_is_503_when_the_broker_is_down(test_env):
    cluster = Cluster(test_env["tmp"] / "logs" / "readiness", env={"FERRY_BROKER_URL": "redis://127.0.0.1:9/0"})
    port = free_port()
    cluster.start("api", launch.api_command(f"127.0.0.1:{port}", workers=1, threads=2))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, cluster.logs("api")
            time.sleep(0.2)
        r = httpx.get(url + "/readyz", timeout=30)
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "not ready"
        assert body["checks"]["database"] == "ok"
        assert body["checks"]["broker"].startswith("failed")
    finally:
        cluster.stop()


def _ready(url: str) -> tuple[int, dict]:
    r = httpx.get(url + "/readyz", timeout=30)
    return r.status_code, r.json()


def _until(url: str, status: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, body = _ready(url)
        if code == status:
            return body
        assert time.monotonic() < deadline, (code, body)
        time.sleep(0.3)


def test_readyz_fails_while_the_database_or_broker_is_unreachable_and_recovers_by_itself(test_env):
    """The API reaches Postgres and Redis through cables the test unplugs and plugs back:
    not ready (503, naming what failed) while either is away, ready again without a restart."""
    db, broker = urlsplit(os.environ["FERRY_DATABASE_URL"]), urlsplit(os.environ["FERRY_BROKER_URL"])
    pg, redis = Cable(db.hostname, db.port or 5432), Cable(broker.hostname, broker.port or 6379)
    env = {"FERRY_DATABASE_URL": db._replace(netloc=f"{db.username}@127.0.0.1:{pg.port}").geturl(),
           "FERRY_BROKER_URL": broker._replace(netloc=f"127.0.0.1:{redis.port}").geturl()}
    cluster = Cluster(test_env["tmp"] / "logs" / "recovery", env=env)
    try:
        url = cluster.start_api(workers=1)
        assert _ready(url) == (200, {"status": "ready", "checks": {"database": "ok", "broker": "ok"}})
        pg.unplug()
        body = _until(url, 503)
        assert body["checks"]["database"].startswith("failed") and body["checks"]["broker"] == "ok", body
        pg.plug()
        _until(url, 200)
        redis.unplug()
        body = _until(url, 503)
        assert body["checks"]["broker"].startswith("failed") and body["checks"]["database"] == "ok", body
        redis.plug()
        _until(url, 200)
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200  # alive throughout
    except BaseException:
        cluster.print_logs()
        raise
    finally:
        cluster.stop()
        pg.close()
        redis.close()


def test_sigterm_drains_the_api_requests_under_way_finish(test_env):
    """SIGTERM to `ferry api`'s gunicorn: a request under way (a live event stream bound to
    3 s) still gets its whole answer, then the server exits by itself with code 0."""
    cluster = Cluster(test_env["tmp"] / "logs" / "drain")
    try:
        url = cluster.start_api(workers=1)
        with httpx.Client(base_url=url, timeout=30, headers=auth()) as api, \
                api.stream("GET", "/v1/events/stream", params={"max_seconds": 3}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)  # the stream is under way
            cluster.procs["api"].send_signal(signal.SIGTERM)
            rest = list(lines)
        assert any(line.startswith("event: end") for line in rest), rest
        assert cluster.procs["api"].wait(timeout=20) == 0, cluster.logs("api")
    finally:
        cluster.stop()
