"""/readyz tells the truth: a broker that does not answer makes the API not ready (503)."""

from __future__ import annotations

import time

import httpx
import pytest

from ferry.cli import launch
from tests.fixtures.cluster import Cluster, free_port

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
