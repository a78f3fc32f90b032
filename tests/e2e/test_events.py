"""Live events from a real gunicorn API process over Postgres, with a worker and beat doing
the work: a migrate job's progress then its end, a replica state change and an alert
reaching streams filtered to them, and `ferry job watch` / `ferry events` following them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete

from ferry.catalog.db import transaction
from ferry.catalog.models import Policy, utcnow
from ferry.cli.client import SseParser
from tests.fixtures.cable import Cable
from tests.fixtures.cluster import auth, running_cluster, wait_job

pytestmark = pytest.mark.e2e

FERRY = str(Path(sys.executable).parent / "ferry")
Seen = list[tuple[str, dict, str | None]]


@pytest.fixture(scope="module")
def cluster(test_env, s3_backend) -> Iterator:
    env = {"FERRY_EVENTS_POLL_SECONDS": "0.2", "FERRY_EVENTS_MAX_STREAMS": "4", "FERRY_BATCH_ITEMS": "10",
           "FERRY_RECONCILE_INTERVAL_SECONDS": "1"}
    with running_cluster(test_env, "events", env, beat=True) as c:
        yield c


@pytest.fixture(scope="module")
def api(cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.api_url, timeout=60, headers=auth()) as client:
        yield client


def read_stream(url: str, params: dict, stop: Callable[[Seen], bool] = lambda seen: False) -> Seen:
    """Events of /v1/events/stream, read with httpx as they come, until `stop` says so or
    the server ends the stream."""
    seen: Seen = []
    parser = SseParser()
    with httpx.Client(base_url=url, headers=auth(), timeout=httpx.Timeout(10, read=40)) as client:
        with client.stream("GET", "/v1/events/stream", params=params) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    seen.append((event.event, event.json(), event.id))
                    if stop(seen):
                        break
    return seen


def files(root: Path, n: int, size: int = 2048) -> None:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"{i:03d}.bin").write_bytes(bytes([i % 251]) * size)


def test_a_migrate_job_streams_its_progress_then_its_end(cluster, api, disks):
    files(disks / "local" / "ev-mig", 120)
    r = api.post("/v1/jobs", json={"kind": "migrate", "source": {"backend": "local", "prefix": "ev-mig/"},
                                   "targets": [{"backend": "archive", "prefix": "ev-mig/"}]})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    seen = read_stream(cluster.api_url, {"job": job_id, "until": "job_done", "types": "job", "max_seconds": 60})
    assert seen[-1][:2] == ("end", {"reason": "job_done"})
    jobs = [data for name, data, _ in seen if name == "job"]
    assert {j["id"] for j in jobs} == {job_id}
    assert jobs[0]["state"] in ("pending", "running")  # what it was when the stream began
    assert len(jobs) >= 2 and all(j["state"] in ("pending", "running") for j in jobs[:-1])
    done = [j["items"]["done"] for j in jobs]
    assert done == sorted(done)  # progress only grows
    assert jobs[-1]["state"] == "succeeded" and jobs[-1]["items"]["done"] == 120
    assert jobs[-1] == api.get(f"/v1/jobs/{job_id}").json()  # the shape GET /v1/jobs/{id} gives


def test_a_replica_change_and_an_alert_reach_streams_filtered_to_them(cluster, api, disks):
    name = "ev-broken"

    def replica_bad(seen: Seen) -> bool:
        return any(n == "replica" and d["key"] == "ev-rep/only.txt" and d["state"] == "bad" for n, d, _ in seen)

    def alert_seen(seen: Seen) -> bool:
        return any(n == "alert" for n, _, _ in seen)

    since = utcnow().isoformat()  # the streams may connect after the work began: nothing is missed
    with ThreadPoolExecutor(2) as pool:
        replicas = pool.submit(read_stream, cluster.api_url, {"backend": "mirror", "types": "replica", "since": since,
                                                              "max_seconds": 45}, replica_bad)
        alerts = pool.submit(read_stream, cluster.api_url, {"policy": name, "types": "alert", "since": since,
                                                            "max_seconds": 45}, alert_seen)
        # What each stream should hear of, and more it should not.
        (disks / "local" / "ev-rep").mkdir(parents=True)
        (disks / "local" / "ev-rep" / "only.txt").write_text("to be corrupted on mirror\n")
        r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "local", "keys": ["ev-rep/only.txt"]},
                                       "targets": [{"backend": "mirror"}]})
        assert wait_job(api, r.json()["id"], timeout=60)["state"] == "succeeded"
        # Both copies corrupted, so healing cannot repair mirror's: a stream tells a replica's
        # state as it is when it reads the catalog, and a repair can end before the next read.
        (disks / "mirror" / "ev-rep" / "only.txt").write_text("corrupted\n")
        (disks / "local" / "ev-rep" / "only.txt").write_text("corrupted too\n")
        r = api.post("/v1/jobs", json={"kind": "verify", "source": {"backend": "mirror", "keys": ["ev-rep/only.txt"]}})
        assert wait_job(api, r.json()["id"], timeout=60)["state"] == "succeeded"
        # A policy whose stored document no longer validates (as if written by another
        # version of Ferry): the next reconcile pass raises an alert about it.
        with transaction() as session:
            session.add(Policy(name=name, version=1, document={"name": name, "replicas": "many"},
                               created_at=utcnow(), updated_at=utcnow()))
        try:
            replica_events, alert_events = replicas.result(timeout=50), alerts.result(timeout=50)
        except Exception:
            cluster.print_logs()
            raise
        finally:
            with transaction() as session:
                session.execute(delete(Policy).where(Policy.name == name))

    assert {d["backend"] for _, d, _ in replica_events} == {"mirror"}  # local's changed too: not sent
    states = [d["state"] for _, d, _ in replica_events if d["key"] == "ev-rep/only.txt"]
    assert states[0] == "present" and states[-1] == "bad"
    bad = next(d for _, d, _ in replica_events if d["state"] == "bad")
    assert bad["cid"] == api.get("/v1/objects/" + bad["cid"]).json()["cid"] and "sha256" in bad["last_error"]
    [(kind, alert, cursor)] = alert_events
    assert (kind, alert["kind"], alert["policy"], alert["severity"]) == ("alert", "policy.failed", name, "error")
    assert cursor and cursor.startswith("1.")


def ferry(cluster, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FERRY_API_URL": cluster.api_url}
    return subprocess.run([FERRY, *args], capture_output=True, text=True, env=env, timeout=120)


def test_ferry_job_watch_rides_out_a_dropped_connection_and_ends_with_the_job(cluster, api, disks):
    """The connection to the API cut mid-watch (a cable unplugged for a second and a half):
    `ferry job watch` connects again by itself and ends when the job does."""
    files(disks / "local" / "ev-cut", 20)
    cable = Cable("127.0.0.1", int(cluster.api_url.rsplit(":", 1)[1]))
    worker = cluster.procs["w1"]
    os.killpg(worker.pid, signal.SIGSTOP)  # the job waits, unstarted, while the watch connects
    try:
        job_id = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "local", "prefix": "ev-cut/"},
                                            "targets": [{"backend": "archive", "prefix": "ev-cut/"}]}).json()["id"]
        watch = subprocess.Popen([FERRY, "job", "watch", job_id, "--json"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "FERRY_API_URL": f"http://127.0.0.1:{cable.port}"})
        asked = f"/v1/events/stream?job={job_id}"
        deadline = time.monotonic() + 30
        while cluster.logs("api", tail=10**9).count(asked) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cluster.logs("api", tail=10**9).count(asked) == 1, "the watch never reached the stream"
        time.sleep(0.5)
        cable.unplug()
        time.sleep(1.5)
        cable.plug()
    finally:
        os.killpg(worker.pid, signal.SIGCONT)
    try:
        out, err = watch.communicate(timeout=120)
    finally:
        cable.close()
    assert watch.returncode == 0, err
    assert json.loads(out)["state"] == "succeeded" and json.loads(out)["items"]["done"] == 20
    assert cluster.logs("api", tail=10**9).count(asked) >= 2  # it asked again, after the cut
    assert "polling" not in err


def test_ferry_job_watch_follows_the_stream_and_exits_as_the_job_ended(cluster, api, disks):
    files(disks / "local" / "ev-watch", 30)
    ok = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "local", "prefix": "ev-watch/"},
                                    "targets": [{"backend": "archive", "prefix": "ev-watch/"}]}).json()["id"]
    partly = api.post("/v1/jobs", json={"kind": "replicate",
                                        "source": {"backend": "local", "keys": ["ev-watch/000.bin", "ev-watch/nope"]},
                                        "targets": [{"backend": "mirror"}]}).json()["id"]
    watched = ferry(cluster, "job", "watch", ok, "--json")
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["state"] == "succeeded" and json.loads(watched.stdout)["items"]["done"] == 30
    failed = ferry(cluster, "job", "watch", partly)
    assert failed.returncode == 1, failed.stderr
    assert "partially_failed" in failed.stdout and "ev-watch/nope" in failed.stderr
    for r in (watched, failed):
        assert "polling" not in r.stderr  # the stream, not the fallback
    access_log = cluster.logs("api", tail=10**9)
    assert f"/v1/events/stream?job={ok}" in access_log and f"/v1/events/stream?job={partly}" in access_log
    assert f"/v1/jobs/{ok} " not in access_log  # never polled
    # `ferry events`: the ended job's state, as NDJSON, then the bound.
    listed = ferry(cluster, "events", "--job", ok, "--types", "job", "--json", "--max-seconds", "0.5")
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    event = json.loads(line)
    assert (event["event"], event["data"]["id"], event["data"]["state"]) == ("job", ok, "succeeded")
