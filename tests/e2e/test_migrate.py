"""End to end through the HTTP API, real workers, Postgres, Redis and the S3 peer:
1 000 objects of mixed sizes migrated local -> S3, then replicated S3 -> local."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ferry.catalog.db import transaction
from ferry.catalog.models import Replica, ReplicaState, StoredObject
from tests.fixtures.cluster import wait_job
from tests.fixtures.s3peer import s3_client

pytestmark = pytest.mark.e2e

N_OBJECTS = 1000


def make_corpus(root: Path, n: int, seed: int = 7) -> dict[str, str]:
    """n files from 0 B to 20 MiB, mostly small as real trees are; returns key -> sha256."""
    rng = random.Random(seed)
    sizes = [0, 1, 262144, 262145, 20 * 2**20]
    sizes += [rng.randint(2**20, 4 * 2**20) for _ in range(25)]
    sizes += [rng.randint(0, 128 * 1024) for _ in range(n - len(sizes))]
    rng.shuffle(sizes)
    digests = {}
    block = rng.randbytes(2**20)
    for i, size in enumerate(sizes):
        key = f"e2e/d{i % 10}/obj-{i:04d}.bin"
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unique content per file: a header with its index, then pseudo-random bytes.
        data = (f"{i}:".encode() + block * (size // len(block) + 1))[:size]
        path.write_bytes(data)
        digests[key] = hashlib.sha256(data).hexdigest()
    return digests


def s3_sha256(client, bucket: str, key: str) -> str:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    h = hashlib.sha256()
    for chunk in body.iter_chunks(2**20):
        h.update(chunk)
    return h.hexdigest()


def test_migrate_local_to_s3_then_replicate_back(api, disks, s3_server):
    corpus = make_corpus(disks / "local", N_OBJECTS)
    total_bytes = sum(p.stat().st_size for p in (disks / "local" / "e2e").rglob("*") if p.is_file())

    r = api.post("/v1/jobs", json={"kind": "migrate", "source": {"backend": "local", "prefix": "e2e/"},
                                    "targets": [{"backend": "s3", "prefix": "moved/"}]})
    assert r.status_code == 202, r.text
    assert r.headers["Location"].endswith(r.json()["id"])
    job = wait_job(api, r.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["total"] == N_OBJECTS
    assert job["items"] == {"queued": 0, "running": 0, "done": N_OBJECTS, "failed": 0, "skipped": 0,
                            "cancelled": 0, "stuck": 0, "total": N_OBJECTS}
    assert job["bytes"] == {"done": total_bytes, "known": total_bytes, "in_flight": 0}

    # Every source is gone, every byte arrived.
    assert not any(p.is_file() for p in (disks / "local" / "e2e").rglob("*"))
    client = s3_client(s3_server)
    listed = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="ferry-e2e", Prefix="moved/")
              for o in page.get("Contents", [])]
    assert sorted(listed) == sorted("moved/" + k.removeprefix("e2e/") for k in corpus)
    for key, sha in corpus.items():
        assert s3_sha256(client, "ferry-e2e", "moved/" + key.removeprefix("e2e/")) == sha, key

    # The catalog agrees: one object per content, S3 replicas present and verified, sources gone.
    with transaction() as s:
        objects = dict(s.execute(select(StoredObject.sha256, StoredObject.id)).all())
        assert set(corpus.values()) <= set(objects)
        states = dict(s.execute(select(Replica.key, Replica.state).where(Replica.backend == "s3")).all())
        assert all(states["moved/" + k.removeprefix("e2e/")] == ReplicaState.present for k in corpus)
        unverified = s.scalar(select(func.count()).select_from(Replica).where(
            Replica.backend == "s3", Replica.key.startswith("moved/"), Replica.verified_at.is_(None)))
        assert unverified == 0
        src = dict(s.execute(select(Replica.key, Replica.state).where(Replica.backend == "local")).all())
        assert all(src[k] == ReplicaState.gone for k in corpus)

    # Replicate back to local disk, compare every byte.
    r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "s3", "prefix": "moved/"},
                                    "targets": [{"backend": "local", "prefix": "back/"}]})
    job = wait_job(api, r.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["items"]["done"] == N_OBJECTS
    for key, sha in corpus.items():
        data = (disks / "local" / "back" / key.removeprefix("e2e/")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha, key

    # Running it again finds every copy verified already: all skipped, nothing rewritten.
    r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "s3", "prefix": "moved/"},
                                    "targets": [{"backend": "local", "prefix": "back/"}]})
    job = wait_job(api, r.json()["id"])
    assert job["state"] == "succeeded"
    assert job["items"]["skipped"] == N_OBJECTS and job["items"]["done"] == 0

    # An object by CID lists its replicas on both backends.
    with transaction() as s:
        cid = s.scalar(select(StoredObject.cid).where(StoredObject.sha256 == corpus["e2e/d0/obj-0000.bin"]))
    obj = api.get(f"/v1/objects/{cid}").json()
    by_backend = {(r["backend"], r["state"]) for r in obj["replicas"]}
    assert ("s3", "present") in by_backend and ("local", "present") in by_backend and ("local", "gone") in by_backend


def test_missing_source_key_fails_its_item_only(api, disks):
    root = disks / "local" / "mixed"
    root.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (root / f"ok-{i}.txt").write_text(f"content {i}")
    keys = [f"mixed/ok-{i}.txt" for i in range(3)] + ["mixed/not-there.txt"]
    r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "local", "keys": keys},
                                    "targets": [{"backend": "archive"}]})
    assert r.status_code == 202
    job = wait_job(api, r.json()["id"])
    assert job["state"] == "partially_failed"
    assert job["items"]["done"] == 3 and job["items"]["failed"] == 1
    failed = api.get(f"/v1/jobs/{job['id']}/items", params={"state": "failed"}).json()["items"]
    assert [f["source_key"] for f in failed] == ["mixed/not-there.txt"]
    assert "not found" in failed[0]["error"]
    for i in range(3):
        assert (disks / "archive" / "mixed" / f"ok-{i}.txt").read_text() == f"content {i}"


def test_keep_source_and_cancel(api, disks):
    root = disks / "local" / "keep"
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("kept")
    job = wait_job(api, api.post("/v1/jobs", json={
        "kind": "migrate", "keep_source": True, "source": {"backend": "local", "prefix": "keep/"},
        "targets": [{"backend": "archive", "prefix": "kept/"}]}).json()["id"])
    assert job["state"] == "succeeded"
    assert (root / "a.txt").read_text() == "kept"
    assert (disks / "archive" / "kept" / "a.txt").read_text() == "kept"
    # A finished job cannot be cancelled: 409 with the reason.
    r = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"


def test_empty_prefix_fails_the_job_with_a_reason(api):
    r = api.post("/v1/jobs", json={"kind": "migrate", "source": {"backend": "local", "prefix": "nothing-here/"},
                                    "targets": [{"backend": "archive"}]})
    job = wait_job(api, r.json()["id"])
    assert job["state"] == "failed"
    assert "matched no objects" in job["error"]


def test_unreachable_backend_fails_items_with_the_reason_after_retries(api, disks):
    """No fallback, no pretend success: the item is retried with backoff, then fails saying why."""
    (disks / "local" / "down").mkdir(parents=True, exist_ok=True)
    (disks / "local" / "down" / "a.txt").write_text("a")
    r = api.post("/v1/jobs", json={"kind": "migrate", "source": {"backend": "local", "keys": ["down/a.txt"]},
                                    "targets": [{"backend": "s3-down"}]})
    job = wait_job(api, r.json()["id"], timeout=120)
    assert job["state"] == "failed"
    [item] = api.get(f"/v1/jobs/{job['id']}/items").json()["items"]
    assert item["attempts"] == 3
    assert item["error"].startswith("gave up after 3 attempts") and "127.0.0.1:9" in item["error"]
    assert (disks / "local" / "down" / "a.txt").read_text() == "a"  # the source is untouched
