"""Operations through real processes: a worker's metrics (summed over its prefork pool by the
multiprocess registry) after real jobs, the API's catalog and broker gauges, both accepted
by `promtool check metrics`; Flower behind basic auth, naming each worker by its backend;
JSON log lines carrying the job, item, CID and backend."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferry.cli.launch import all_queues
from ferry.settings import get_settings
from tasks.app import app as celery_app
from tasks.app import queue_for
from tests.fixtures.cluster import Cluster, auth, free_port, running_cluster, wait_job

pytestmark = pytest.mark.e2e


FERRY = str(Path(sys.executable).with_name("ferry"))
UNREAD = "s3-down"  # no worker of this module reads its queue: its messages wait there


@pytest.fixture(scope="module")
def metered(test_env, s3_backend) -> Iterator[tuple[Cluster, str]]:
    port = free_port()
    with celery_app.connection_for_write() as conn:  # earlier modules' unconsumed batches would count too
        for q in all_queues(get_settings()):
            conn.default_channel.queue_purge(q)
    queues = [q for q in all_queues(get_settings()) if q != queue_for(UNREAD)]
    with running_cluster(test_env, "ops", {}, api_workers=1, worker_metrics_port=port, worker_queues=queues) as c:
        yield c, f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def api(metered) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=metered[0].api_url, timeout=60, headers=auth()) as client:
        yield client


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/test.sh installs Debian's prometheus package, which has it"
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool check metrics: {r.stdout}{r.stderr}"


def test_worker_counts_items_bytes_and_batch_latency_across_its_pool(api, metered, disks):
    root = disks / "local" / "metered"
    root.mkdir(parents=True, exist_ok=True)
    sizes = [1000 + 37 * i for i in range(12)]
    started = time.time()
    for i, n in enumerate(sizes):
        (root / f"f{i:02}.bin").write_bytes(os.urandom(n))
    r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "local", "prefix": "metered/"},
                                    "targets": [{"backend": "archive", "prefix": "metered-copy/"}]})
    assert r.status_code == 202, r.text
    assert wait_job(api, r.json()["id"])["state"] == "succeeded"
    found = samples(httpx.get(metered[1], timeout=10).text)
    assert value(found, "ferry_items_processed_total", verb="copy", backend="archive", outcome="done") == len(sizes)
    assert value(found, "ferry_transferred_bytes_total", verb="copy", backend="archive") == sum(sizes)

    # A replica gone bad, then a verify job over both copies' backends.
    bad = disks / "archive" / "metered-copy" / "f00.bin"
    bad.write_bytes(b"x" * sizes[0])
    r = api.post("/v1/jobs", json={"kind": "verify", "source": {"backend": "archive", "prefix": "metered-copy/"}})
    assert r.status_code == 202, r.text
    wait_job(api, r.json()["id"])

    text = httpx.get(metered[1], timeout=10).text
    found = samples(text)
    # The verify job's end starts a healing pass, whose repair of f00.bin may be done by now.
    repaired = value(found, "ferry_items_processed_total", verb="copy", backend="archive", outcome="done") - len(sizes)
    assert repaired in (0, 1)
    assert value(found, "ferry_transferred_bytes_total", verb="copy", backend="archive") == \
        sum(sizes) + repaired * sizes[0]
    assert value(found, "ferry_items_processed_total", verb="verify", backend="archive", outcome="done") == len(sizes)
    assert value(found, "ferry_verifications_total", backend="archive", result="bad") == 1
    assert value(found, "ferry_verifications_total", backend="archive", result="ok") == len(sizes) - 1
    # A finished verification asks for a reconcile pass: the worker counts it and stamps it.
    deadline = time.monotonic() + 30
    while (value(found, "ferry_reconcile_passes_total", outcome="done") or 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        text = httpx.get(metered[1], timeout=10).text
        found = samples(text)
    assert value(found, "ferry_reconcile_passes_total", outcome="done") >= 1
    assert started - 1 <= value(found, "ferry_reconcile_last_pass_timestamp_seconds") <= time.time() + 1
    batches = value(found, "ferry_task_duration_seconds_count", verb="copy", backend="archive")
    assert batches is not None and batches >= 1
    assert value(found, "ferry_task_duration_seconds_bucket", verb="copy", backend="archive", le="+Inf") == batches
    promtool_check(text)

    text = api.get("/metrics").text
    found = samples(text)
    assert value(found, "ferry_jobs", kind="replicate", state="succeeded") >= 1
    # (The bad replica may be healed from its source by now: the gauges are checked against
    # the catalog in tests/unit/test_api.py, where nothing else runs.)
    assert value(found, "ferry_broker_up") == 1
    promtool_check(text)


def test_api_reports_each_queue_depth_as_the_broker_counts_it(api):
    queue = queue_for(UNREAD)
    with celery_app.connection_for_write() as conn:
        conn.default_channel.queue_purge(queue)
    try:
        for _ in range(3):  # batches of a job that does not exist: a worker would drop them
            celery_app.send_task("ferry.transfer", args=[str(uuid.uuid4()), [[1, 1]]], queue=queue)
        found = samples(api.get("/metrics").text)
        assert value(found, "ferry_queue_depth", queue=queue, backend=UNREAD) == 3
        assert value(found, "ferry_queue_depth", queue="ferry.control", backend="") is not None
        assert value(found, "ferry_queue_depth", queue="index", backend="@search") is not None
    finally:
        with celery_app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue)


def test_flower_answers_only_with_credentials_and_names_workers_by_backend(metered, test_env):
    from ferry.cli import launch

    assert launch.worker_name(["backend.s3-archive"]) == "s3-archive@%h"
    assert launch.worker_name(["index"]) == "index@%h" and launch.worker_name(["ferry.control"]) == "control@%h"
    port = free_port()
    refused = subprocess.run([FERRY, "flower", "--port", str(port)],
                             env={k: v for k, v in os.environ.items() if k != "FERRY_FLOWER_BASIC_AUTH"},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "FERRY_FLOWER_BASIC_AUTH" in refused.stderr
    cluster = metered[0]
    cluster.start("flower", [FERRY, "flower", "--port", str(port)],
                  env={"FERRY_FLOWER_BASIC_AUTH": "ops:s3cret-pass", "FLOWER_UNAUTHENTICATED_API": "true"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/healthcheck", timeout=5).status_code == 200:  # probes need no credentials
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, cluster.logs("flower")
        time.sleep(0.3)
    assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401
    assert httpx.get(f"{base}/api/workers", auth=("ops", "wrong"), timeout=10).status_code == 401
    deadline = time.monotonic() + 60
    while True:  # Flower learns of workers from their events and a first inspect
        r = httpx.get(f"{base}/api/workers", params={"refresh": "true"}, auth=("ops", "s3cret-pass"), timeout=30)
        assert r.status_code == 200, r.text
        if any(name.startswith("w1@") for name in r.json()):
            break
        assert time.monotonic() < deadline, (r.json(), cluster.logs("flower"))
        time.sleep(1)
    queues = {q["name"] for q in r.json()[next(n for n in r.json() if n.startswith("w1@"))]["active_queues"]}
    assert queue_for("archive") in queues and queue_for(UNREAD) not in queues


def test_worker_and_api_log_json_lines_with_the_ids_of_their_work(metered, api):
    import json

    lines = [json.loads(line) for line in metered[0].logs("w1", tail=10**7).splitlines() if line.startswith("{")]
    assert lines, "the worker logs JSON when its stderr is not a terminal"
    for line in lines:
        assert {"time", "level", "logger", "message", "job", "item", "cid", "backend"} <= line.keys(), line
    bad = [x for x in lines if "is bad" in x["message"]]  # the verification that found f00.bin rotten
    assert bad and bad[0]["job"] and bad[0]["backend"] == "archive" and bad[0]["item"] is not None, bad
    assert bad[0]["cid"] and bad[0]["cid"].startswith("b"), bad
    r = api.get("/v1/jobs", headers={"X-Request-ID": "trace-me-42"})
    assert r.headers["X-Request-ID"] == "trace-me-42"
    deadline = time.monotonic() + 10
    while True:
        access = [json.loads(x) for x in metered[0].logs("api", tail=10**7).splitlines() if "trace-me-42" in x]
        if access or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert access and access[0]["logger"] == "ferry.api.access" and access[0]["status"] == 200, access
    assert access[0]["message"].startswith("GET /v1/jobs") and access[0]["actor"], access
