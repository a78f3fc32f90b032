"""Policies end to end: API, a real worker and beat driving reconcile passes every second,
against Postgres, Redis and local disks. Each test works under its own key prefix and
deletes its policy, so the passes of one test never act on another's objects."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select

from ferry.catalog.db import transaction
from ferry.catalog.models import JobItem, Replica, StoredObject
from tasks.reconcile import run_pass
from tests.fixtures.cluster import Cluster, running_cluster, wait_job

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(test_env, s3_backend) -> Iterator[Cluster]:
    """Beat too, passing every second; few attempts, so failing work is stuck in seconds."""
    with running_cluster(test_env, "policies", {"FERRY_RECONCILE_INTERVAL_SECONDS": "1", "FERRY_MAX_ATTEMPTS": "2"},
                         beat=True) as c:
        yield c


@pytest.fixture
def policy(api) -> Iterator[Callable[[dict], dict]]:
    """Apply policies for one test; delete them after it."""
    names = []

    def apply(doc: dict) -> dict:
        r = api.post("/v1/policies", json={"yaml": yaml.safe_dump(doc)})
        assert r.status_code in (200, 201), r.text
        names.append(doc["name"])
        return r.json()

    yield apply
    for name in names:
        api.delete(f"/v1/policies/{name}")


def wait_for(what: str, check: Callable[[], object], timeout: float = 90) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {check()!r}")


def ingest(api: httpx.Client, disks: Path, prefix: str, n: int, size: int = 3000,
           tags: list[str] | None = None) -> dict[str, bytes]:
    """n files catalogued with one verified replica on `local`: written to `archive`, then
    migrated to `local` (the archive copy is deleted)."""
    files = {}
    for i in range(n):
        key = f"{prefix}f{i:03d}.bin"
        data = (f"{prefix}{i}:".encode() * (size // 8 + 1))[:size]
        path = disks / "archive" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[key] = data
    r = api.post("/v1/jobs", json={"kind": "migrate", "source": {"backend": "archive", "prefix": prefix},
                                    "targets": [{"backend": "local", "prefix": prefix}], "tags": tags or []})
    assert r.status_code == 202, r.text
    assert wait_job(api, r.json()["id"])["state"] == "succeeded"
    return files


def replica_states(prefix: str) -> dict[tuple[str, str], str]:
    with transaction() as s:
        return {(r.backend, r.key): r.state.value
                for r in s.scalars(select(Replica).where(Replica.key.startswith(prefix)))}


def cid_of(key: str) -> str:
    with transaction() as s:
        return s.scalar(select(StoredObject.cid).join(Replica).where(Replica.key == key, Replica.backend == "local"))


def status(api: httpx.Client, name: str) -> dict:
    r = api.get(f"/v1/policies/{name}/status")
    assert r.status_code == 200, r.text
    return r.json()


def quiet_pass() -> dict:
    """A reconcile pass run here, beside beat's (retried while beat's holds the lock)."""
    for _ in range(50):
        report = run_pass()
        if "skipped" not in report:
            return report
        time.sleep(0.1)
    raise AssertionError("no pass could take the lock")


def two_hot(name: str, prefix: str) -> dict:
    return {"name": name, "selector": {"backend": "local", "prefix": prefix},
            "placement": {"backends": "tier=hot", "replicas": 2, "spread": "zone"}}


def converge(api, policy, disks, name: str, prefix: str, n: int) -> dict[str, bytes]:
    files = ingest(api, disks, prefix, n)
    policy(two_hot(name, prefix))
    wait_for(f"{name} to converge", lambda: status(api, name)["converged"] == n)
    return files


def test_two_replica_policy_converges_and_a_second_pass_enqueues_nothing(api, policy, disks):
    files = ingest(api, disks, "pa/", 20)
    assert set(replica_states("pa/").values()) <= {"present", "gone"}
    applied = policy(two_hot("two-hot-a", "pa/"))
    assert applied["version"] == 1 and applied["changed"]
    plan = api.get("/v1/policies/two-hot-a/plan").json()
    # The plan may already be partly under way (beat runs every second): copies planned or done.
    assert plan["copy"]["objects"] in range(0, 21)
    wait_for("convergence", lambda: status(api, "two-hot-a")["converged"] == 20)
    s = status(api, "two-hot-a")
    assert (s["matched"], s["converged"], s["stuck"], s["bad"], s["lost"]) == (20, 20, 0, 0, 0)
    for key, data in files.items():
        assert (disks / "mirror" / key).read_bytes() == data  # spread over zones a (local) and b (mirror)
    report = quiet_pass()
    assert report["items"] == 0, report
    assert report["job"] is None
    plan = api.get("/v1/policies/two-hot-a/plan").json()
    assert all(plan[v]["objects"] == 0 for v in ("copy", "move", "delete", "verify")), plan
    # Applying the same document again stores no new version.
    again = api.post("/v1/policies", json={"yaml": yaml.safe_dump(two_hot("two-hot-a", "pa/"))})
    assert again.status_code == 200 and again.json()["version"] == 1 and not again.json()["changed"]


def verify(api: httpx.Client, backend: str, prefix: str) -> dict:
    r = api.post("/v1/jobs", json={"kind": "verify", "source": {"backend": backend, "prefix": prefix}})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"])
    assert job["state"] == "succeeded", job
    return api.get(f"/v1/jobs/{job['id']}/report").json()


def test_flipped_bytes_are_detected_and_healed_from_the_good_replica(api, policy, disks):
    files = converge(api, policy, disks, "two-hot-b", "pb/", 5)
    key = "pb/f002.bin"
    path = disks / "mirror" / key
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    report = verify(api, "mirror", "pb/")
    assert (report["checked"], report["ok"], report["bad"], report["missing"]) == (5, 4, 1, 0), report
    assert report["findings"][0]["key"] == key and report["findings"][0]["healing"] in (
        "scheduled", "in_progress", "healed")
    wait_for("the bad replica to be healed", lambda: replica_states("pb/")[("mirror", key)] == "present")
    assert path.read_bytes() == files[key]
    assert (disks / "local" / key).read_bytes() == files[key]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(files[key]).hexdigest()


def test_a_deleted_replica_is_detected_and_healed(api, policy, disks):
    files = converge(api, policy, disks, "two-hot-c", "pc/", 3)
    key = "pc/f001.bin"
    (disks / "local" / key).unlink()
    report = verify(api, "local", "pc/")  # checks what the catalog says is there, so finds it gone
    assert (report["checked"], report["ok"], report["missing"]) == (3, 2, 1), report
    wait_for("the missing replica to be healed", lambda: (disks / "local" / key).exists()
             and replica_states("pc/")[("local", key)] == "present")
    assert (disks / "local" / key).read_bytes() == files[key]


def test_both_replicas_corrupt_marks_the_object_lost_and_deletes_nothing(api, policy, disks):
    converge(api, policy, disks, "two-hot-d", "pd/", 2)
    key = "pd/f000.bin"
    for backend in ("local", "mirror"):
        (disks / backend / key).write_bytes(b"rot" * 1000)
    for backend in ("local", "mirror"):
        r = api.post("/v1/jobs", json={"kind": "verify", "source": {"backend": backend, "keys": [key]}})
        wait_job(api, r.json()["id"])
    cid = cid_of(key)
    obj = wait_for("the object to be marked lost",
                   lambda: (o := api.get(f"/v1/objects/{cid}").json()).get("lost_at") and o)
    assert {r["state"] for r in obj["replicas"] if r["backend"] in ("local", "mirror")} == {"bad"}
    events = api.get("/v1/events", params={"kind": "object.lost", "cid": cid}).json()["events"]
    assert len(events) == 1 and cid in events[0]["message"] and events[0]["severity"] == "critical"
    assert status(api, "two-hot-d")["lost"] == 1
    quiet_pass()
    for backend in ("local", "mirror"):  # nothing deleted, nothing overwritten
        assert (disks / backend / key).read_bytes() == b"rot" * 1000
    assert api.get(f"/v1/objects/{cid}/content").status_code == 404


def test_age_transition_moves_hot_to_cold_and_deletes_hot_only_after_cold_is_verified(api, policy, disks):
    files = ingest(api, disks, "pe/", 4)
    policy({"name": "age-e", "selector": {"backend": "local", "prefix": "pe/"},
            "placement": {"backends": "tier=hot & zone=a", "replicas": 1},
            "transitions": [{"after": "3s", "since": "creation", "to": "tier=cold & !region"}]})
    wait_for("hot copies to be deleted", lambda: all(
        replica_states("pe/").get(("local", k)) == "gone" for k in files), timeout=120)
    with transaction() as s:
        reps = {(r.backend, r.key): r for r in s.scalars(select(Replica).where(Replica.key.startswith("pe/")))}
    for key, data in files.items():
        cold, hot = reps[("archive", key)], reps[("local", key)]
        assert cold.state.value == "present" and (disks / "archive" / key).read_bytes() == data
        assert not (disks / "local" / key).exists()
        assert cold.verified_at <= hot.updated_at  # the cold copy was verified before the hot one went
    assert status(api, "age-e")["converged"] == 4


def test_retention_deletes_and_a_legal_hold_blocks_it(api, policy, disks):
    ingest(api, disks, "pf/", 2)
    held = cid_of("pf/f001.bin")
    r = api.put(f"/v1/objects/{held}/hold", json={"hold": True})
    assert r.status_code == 200 and r.json()["legal_hold"] is True
    policy({"name": "expire-f", "selector": {"backend": "local", "prefix": "pf/"},
            "retention": {"delete_after": "2s"}})
    wait_for("retention to delete the unheld object",
             lambda: replica_states("pf/").get(("local", "pf/f000.bin")) == "gone", timeout=60)
    assert not (disks / "local" / "pf/f000.bin").exists()
    quiet_pass()
    assert (disks / "local" / "pf/f001.bin").exists()
    assert replica_states("pf/")[("local", "pf/f001.bin")] == "present"


def test_content_streams_from_a_verified_replica_and_records_the_access(api, policy, disks):
    files = ingest(api, disks, "pg/", 1)
    key, data = next(iter(files.items()))
    cid = cid_of(key)
    assert api.get(f"/v1/objects/{cid}").json()["last_accessed_at"] is None
    r = api.get(f"/v1/objects/{cid}/content")
    assert r.status_code == 200 and r.content == data
    assert api.get(f"/v1/objects/{cid}").json()["last_accessed_at"] is not None


def test_an_invalid_policy_gets_a_400_naming_the_field(api, cluster, tmp_path):
    bad = {"name": "bad", "placement": {"backends": "tier=hot", "replicas": {"min": 2, "desired": 4, "max": 3}}}
    r = api.post("/v1/policies", json={"yaml": yaml.safe_dump(bad)})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_policy" and err["field"] == "placement.replicas.desired"
    assert "more than max" in err["message"]
    assert api.get("/v1/policies/bad").status_code == 404


def test_the_cli_applies_plans_reports_and_names_the_faulty_field(api, cluster, disks, tmp_path):
    from tests.e2e.test_cli import ferry

    ingest(api, disks, "ph/", 3)
    doc = tmp_path / "ph.yaml"
    doc.write_text(yaml.safe_dump(two_hot("cli-h", "ph/") | {"schedule": "manual"}))
    try:
        r = ferry(cluster, "policy", "apply", "-f", str(doc))
        assert r.returncode == 0 and "version 1" in r.stdout, r.stderr
        r = ferry(cluster, "policy", "plan", "cli-h", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["copy"]["objects"] == 3  # manual: nothing runs until `policy run`
        r = ferry(cluster, "policy", "run", "cli-h")
        assert r.returncode == 0, r.stderr
        wait_for("the run to converge", lambda: status(api, "cli-h")["converged"] == 3)
        r = ferry(cluster, "policy", "status", "cli-h")
        assert r.returncode == 0 and "3" in r.stdout
        r = ferry(cluster, "verify", "mirror:ph/")
        assert r.returncode == 0 and "3 ok, 0 bad, 0 missing" in r.stdout, r.stdout + r.stderr
        (disks / "mirror" / "ph/f000.bin").write_bytes(b"x")
        r = ferry(cluster, "verify", "mirror:ph/")
        assert r.returncode == 1 and "1 bad" in r.stdout, r.stdout + r.stderr
    finally:
        ferry(cluster, "policy", "delete", "cli-h")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad-cli\nplacement:\n  replicas: {min: 2, desired: 4, max: 3}\n")
    r = ferry(cluster, "policy", "apply", "-f", str(bad))
    assert r.returncode == 2
    assert "placement.replicas.desired" in r.stderr and "more than max" in r.stderr
    r = ferry(cluster, "policy", "apply", "-f", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_work_that_keeps_failing_becomes_stuck_with_its_reason_and_retry_requeues_it(api, policy, disks):
    ingest(api, disks, "pi/", 1)
    policy({"name": "broken-i", "selector": {"backend": "local", "prefix": "pi/"},
            "placement": {"backends": "tier=broken", "replicas": 1}})
    wait_for("the copy to be stuck", lambda: status(api, "broken-i")["stuck"] == 1, timeout=120)
    with transaction() as s:
        item = s.execute(select(JobItem.state, JobItem.error, JobItem.attempts)
                         .where(JobItem.policy == "broken-i")).one()
    assert item.state.value == "stuck" and "gave up after 2 attempts" in item.error and "s3-down" in item.error
    quiet_pass()
    with transaction() as s:  # stuck work is not planned again
        assert len(s.execute(select(JobItem.seq).where(JobItem.policy == "broken-i")).all()) == 1
    r = api.post("/v1/policies/broken-i/retry")
    assert r.status_code == 200 and r.json() == {"requeued": 1}
    wait_for("the retried copy to be stuck again", lambda: status(api, "broken-i")["stuck"] == 1
             and status(api, "broken-i")["replicating"] == 0, timeout=120)


def test_metrics_report_lost_objects_and_replicas_by_state(api):
    text = api.get("/metrics").text
    assert "# TYPE ferry_objects_lost gauge" in text
    lost = [line for line in text.splitlines() if line.startswith("ferry_objects_lost ")]
    with transaction() as s:
        in_catalog = len(s.scalars(select(StoredObject.id).where(StoredObject.lost_at.is_not(None))).all())
    assert lost and float(lost[0].split()[1]) == in_catalog
    assert 'ferry_replicas{backend="mirror",state="present"}' in text


def test_tags_from_a_job_and_from_patch_drive_a_tag_selector(api, policy, disks):
    files = ingest(api, disks, "pj/", 3, tags=["tg-j"])
    policy({"name": "tagged-j", "selector": {"tags": ["tg-j"]},
            "placement": {"backends": "tier=hot", "replicas": 2, "spread": "zone"}})
    wait_for("convergence", lambda: status(api, "tagged-j")["converged"] == 3)
    assert all((disks / "mirror" / k).read_bytes() == d for k, d in files.items())
    cid = cid_of("pj/f000.bin")
    r = api.patch(f"/v1/objects/{cid}", json={"remove_tags": ["tg-j"], "metadata": {"owner": "ops"}})
    assert r.status_code == 200 and r.json()["tags"] == [] and r.json()["metadata"] == {"owner": "ops"}
    assert status(api, "tagged-j")["matched"] == 2
    r = api.patch(f"/v1/objects/{cid}", json={"bogus": 1})
    assert r.status_code == 422 and r.json()["error"]["field"] == "bogus"


def test_content_from_a_replica_gone_bad_is_never_delivered_whole(api, disks):
    ingest(api, disks, "pk/", 1, size=3 * 2**20)  # several chunks
    key = "pk/f000.bin"
    raw = bytearray((disks / "local" / key).read_bytes())
    raw[-10] ^= 0xFF  # rot in the last chunk, which the API holds back until the hash is checked
    (disks / "local" / key).write_bytes(bytes(raw))
    cid = cid_of(key)
    with pytest.raises(httpx.HTTPError):  # the stream stops short of Content-Length
        with api.stream("GET", f"/v1/objects/{cid}/content") as r:
            assert r.status_code == 200
            received = b"".join(r.iter_bytes())
            assert len(received) < 3 * 2**20
            raise httpx.RemoteProtocolError("short body")  # (if the client did not notice by itself)
    wait_for("the replica to be marked bad", lambda: replica_states("pk/")[("local", key)] == "bad", timeout=10)
