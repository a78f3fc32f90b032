"""A worker killed with SIGKILL in the middle of a job: the job still completes once a
new worker starts, nothing is lost and nothing is duplicated in the catalog."""

from __future__ import annotations

import hashlib
import os
import signal
import time

import httpx
import pytest
from sqlalchemy import func, select

from ferry.catalog.db import transaction
from ferry.catalog.models import JobItem, Replica, ReplicaState
from tests.fixtures.cluster import Cluster, auth, wait_job
from tests.fixtures.s3peer import s3_client

pytestmark = pytest.mark.e2e

N = 150


def test_sigkilled_worker_loses_nothing(test_env, disks, s3_server, s3_backend):
    root = disks / "local" / "crash"
    root.mkdir(parents=True)
    digests = {}
    for i in range(N):
        data = f"{i}|".encode() + os.urandom(512 * 1024 + i)
        (root / f"f{i:03d}").write_bytes(data)
        digests[f"f{i:03d}"] = hashlib.sha256(data).hexdigest()

    # Short leases and a fast sweep, so a dead worker's items come back within seconds:
    # claimed items when their lease expires, and batches it had prefetched but not
    # started (unacknowledged in Redis until the visibility timeout) after requeue_after.
    env = {"FERRY_LEASE_SECONDS": "3", "FERRY_RECONCILE_INTERVAL_SECONDS": "1", "FERRY_BATCH_ITEMS": "10",
           "FERRY_REQUEUE_AFTER_SECONDS": "8"}
    cluster = Cluster(test_env["tmp"] / "logs" / "crash", env=env)
    try:
        url = cluster.start_api()
        cluster.start_beat()
        cluster.start_worker("doomed", concurrency=2)
        with httpx.Client(base_url=url, timeout=60, headers=auth()) as api:
            r = api.post("/v1/jobs", json={"kind": "migrate", "source": {"backend": "local", "prefix": "crash/"},
                                            "targets": [{"backend": "s3", "prefix": "crash/"}]})
            job_id = r.json()["id"]
            deadline = time.monotonic() + 120
            while True:  # kill it mid-batch: some items done, some claimed and in flight
                items = api.get(f"/v1/jobs/{job_id}").json()["items"]
                if items["done"] >= 20 and items["running"] > 0:
                    break
                assert time.monotonic() < deadline, cluster.logs("doomed")
                time.sleep(0.02)
            cluster.kill("doomed")

            stuck = api.get(f"/v1/jobs/{job_id}").json()
            assert stuck["state"] == "running", "the job should not finish without a worker"
            time.sleep(4)  # past the lease: the sweeper now re-sends what the dead worker held
            assert api.get(f"/v1/jobs/{job_id}").json()["items"]["done"] < N

            cluster.start_worker("rescuer", concurrency=2)
            job = wait_job(api, job_id, timeout=90)
    except BaseException:
        cluster.print_logs()
        raise
    finally:
        cluster.stop()

    assert job["state"] == "succeeded", job
    assert job["items"]["done"] + job["items"]["skipped"] == N and job["items"]["total"] == N

    # Nothing lost: every object on S3 with its bytes; every source removed only after that.
    client = s3_client(s3_server)
    for name, sha in digests.items():
        body = client.get_object(Bucket="ferry-e2e", Key=f"crash/{name}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == sha
    assert not root.exists() or not any(root.iterdir())

    # Nothing duplicated: one item per object, one replica per location, all final.
    with transaction() as s:
        items = s.scalar(select(func.count()).select_from(JobItem).where(JobItem.job_id == job["id"]))
        assert items == N
        retried = s.scalar(select(func.count()).select_from(JobItem)
                           .where(JobItem.job_id == job["id"], JobItem.attempts > 1))
        assert retried >= 1, "some item should have been re-run after the crash"
        dest = s.execute(select(Replica.key, Replica.state).where(
            Replica.backend == "s3", Replica.key.startswith("crash/"))).all()
        assert len(dest) == N and {st for _, st in dest} == {ReplicaState.present}
        src = s.execute(select(Replica.state, func.count()).where(
            Replica.backend == "local", Replica.key.startswith("crash/")).group_by(Replica.state)).all()
        assert dict(src).get(ReplicaState.gone) == N - sum(n for st, n in src if st != ReplicaState.gone) \
            and all(st in (ReplicaState.gone,) for st, _ in src), src


def test_sigterm_finishes_started_items_and_requeues_the_rest_at_once(test_env, disks, s3_backend):
    """Kubernetes' stop: SIGTERM to the worker mid-batch. It exits by itself well inside a
    grace period, nothing is left `running` under its lease, and the items it did not start
    are back in the queue at once: a new worker ends the job long before any lease (300 s)
    would have run out."""
    n = 120
    root = disks / "local" / "term"
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"f{i:03d}").write_bytes(f"{i}|".encode() + os.urandom(256 * 1024))
    # One batch of every item, so the stop lands in the middle of it; no beat: only the
    # requeue can bring the rest back in time.
    cluster = Cluster(test_env["tmp"] / "logs" / "term", env={"FERRY_BATCH_ITEMS": "1000"})
    try:
        url = cluster.start_api()
        leaving = cluster.start_worker("leaving", concurrency=1)
        with httpx.Client(base_url=url, timeout=60, headers=auth()) as api:
            r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "local", "prefix": "term/"},
                                            "targets": [{"backend": "s3", "prefix": "term/"}]})
            job_id = r.json()["id"]
            deadline = time.monotonic() + 120
            while api.get(f"/v1/jobs/{job_id}").json()["items"]["done"] < 10:
                assert time.monotonic() < deadline, cluster.logs("leaving")
                time.sleep(0.02)
            stopped = time.monotonic()
            leaving.send_signal(signal.SIGTERM)
            leaving.wait(timeout=20)  # on its own: Kubernetes would SIGKILL it after its grace period
            took = time.monotonic() - stopped
            job = api.get(f"/v1/jobs/{job_id}").json()
            assert job["items"]["running"] == 0, job
            assert 0 < job["items"]["done"] < n and job["items"]["queued"] == n - job["items"]["done"], job
            assert "put back in the queue" in cluster.logs("leaving", tail=10**6)
            cluster.start_worker("successor", concurrency=1)
            job = wait_job(api, job_id, timeout=90)
    except BaseException:
        cluster.print_logs()
        raise
    finally:
        cluster.stop()
    assert took < 10, f"the worker took {took:.1f}s to stop"
    assert job["state"] == "succeeded" and job["items"]["done"] == n, job
