"""The `ferry` command against a live API: output, JSON and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

FERRY = str(Path(sys.executable).parent / "ferry")


def ferry(cluster, *args: str, api_url: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FERRY_API_URL": api_url or cluster.api_url}
    return subprocess.run([FERRY, *args], capture_output=True, text=True, env=env, input=stdin, timeout=180)


def test_migrate_prints_a_summary_and_exits_0(cluster, disks):
    root = disks / "local" / "cli-a"
    root.mkdir(parents=True)
    for i in range(12):
        (root / f"{i}.txt").write_text(f"file {i}\n" * (i + 1))
    r = ferry(cluster, "migrate", "local:cli-a/", "archive:cli-a")
    assert r.returncode == 0, r.stderr
    assert "succeeded" in r.stdout and "12" in r.stdout
    assert sorted(p.name for p in (disks / "archive" / "cli-a").iterdir()) == sorted(f"{i}.txt" for i in range(12))
    assert not root.exists() or not any(root.iterdir())


def test_json_output_and_failed_items_exit_1(cluster, disks):
    (disks / "local" / "cli-b").mkdir(parents=True)
    (disks / "local" / "cli-b" / "here.txt").write_text("here")
    r = ferry(cluster, "replicate", "local:", "archive:copies/", "--keys-from", "-", "--json",
              stdin="cli-b/here.txt\ncli-b/missing.txt\n")
    assert r.returncode == 1, r.stderr
    job = json.loads(r.stdout)
    assert job["state"] == "partially_failed"
    assert job["items"]["done"] == 1 and job["items"]["failed"] == 1
    items = ferry(cluster, "job", "items", job["id"], "--state", "failed", "--json")
    assert items.returncode == 0
    [failed] = json.loads(items.stdout)["items"]
    assert failed["source_key"] == "cli-b/missing.txt" and "not found" in failed["error"]
    status = ferry(cluster, "job", "status", job["id"])
    assert status.returncode == 1 and "partially_failed" in status.stdout
    # Cancelling an ended job is refused with the reason.
    cancel = ferry(cluster, "job", "cancel", job["id"])
    assert cancel.returncode == 2 and "already ended" in cancel.stderr


def test_refused_requests_exit_2_with_the_reason(cluster):
    r = ferry(cluster, "migrate", "nowhere:x/", "archive:")
    assert r.returncode == 2
    assert "unknown backend 'nowhere'" in r.stderr and "source.backend" in r.stderr
    r = ferry(cluster, "migrate", "local:../etc/", "archive:")
    assert r.returncode == 2 and "escape" in r.stderr
    r = ferry(cluster, "migrate", "no-colon", "archive:")
    assert r.returncode == 2 and "BACKEND:PATH" in r.stderr


def test_unreachable_api_exits_3(cluster):
    r = ferry(cluster, "job", "status", "8a1e6c7e-1d6b-4b43-9a51-1a2b3c4d5e6f", api_url="http://127.0.0.1:9")
    assert r.returncode == 3
    assert "cannot reach the Ferry API" in r.stderr


def test_no_wait_returns_the_job_id(cluster, disks):
    (disks / "local" / "cli-c").mkdir(parents=True)
    (disks / "local" / "cli-c" / "x").write_text("x")
    r = ferry(cluster, "replicate", "local:cli-c/", "archive:cli-c/", "--no-wait")
    assert r.returncode == 0
    job_id = r.stdout.strip()
    watched = ferry(cluster, "job", "watch", job_id, "--json")
    assert watched.returncode == 0 and json.loads(watched.stdout)["state"] == "succeeded"


def test_admin_keys_from_the_cli_and_the_audit_of_what_they_did(cluster, disks):
    r = ferry(cluster, "admin", "key", "create", "--name", "robot", "--role", "operator",
              "--grant", "read:local", "--grant", "write:arch*", "--json")
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    key, prefix = created["key"], created["prefix"]
    listed = ferry(cluster, "admin", "key", "list", "--json")
    assert key not in listed.stdout
    mine = next(k for k in json.loads(listed.stdout) if k["prefix"] == prefix)
    assert (mine["role"], mine["grants"]) == ("operator", [{"backends": "local", "access": "read"},
                                                           {"backends": "arch*", "access": "write"}])

    (disks / "local" / "cli-k").mkdir(parents=True)
    (disks / "local" / "cli-k" / "f").write_text("f")
    env_key = {**os.environ, "FERRY_API_URL": cluster.api_url, "FERRY_API_KEY": key}

    def as_robot(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([FERRY, *args], capture_output=True, text=True, env=env_key, timeout=180)

    assert as_robot("replicate", "local:cli-k/", "archive:cli-k/").returncode == 0
    denied = as_robot("migrate", "local:cli-k/", "archive:cli-k2/")  # would delete at local
    assert denied.returncode == 2 and "write:local" in denied.stderr, denied.stderr
    assert as_robot("admin", "key", "list").returncode == 2  # not an admin

    audit = ferry(cluster, "audit", "--actor", prefix, "--json")
    entries = json.loads(audit.stdout)
    assert {(e["action"], e["outcome"]) for e in entries} >= {("jobs.create", "ok"), ("jobs.create", "denied"),
                                                             ("keys.list_keys", "denied")}
    assert ferry(cluster, "admin", "key", "revoke", prefix).returncode == 0
    gone = as_robot("events")
    assert gone.returncode == 2 and "revoked" in gone.stderr



def test_the_cli_reads_its_key_from_a_private_file(cluster, tmp_path):
    from ferry.security import write_key_file

    path = tmp_path / "ferry.key"
    write_key_file(path, os.environ["FERRY_API_KEY"])
    env = {k: v for k, v in os.environ.items() if k != "FERRY_API_KEY"}
    env.update(FERRY_API_URL=cluster.api_url, FERRY_API_KEY_FILE=str(path))
    r = subprocess.run([FERRY, "events"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    path.chmod(0o640)
    r = subprocess.run([FERRY, "events"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "readable by others" in r.stderr
    env["FERRY_API_KEY_FILE"] = str(tmp_path / "absent")
    r = subprocess.run([FERRY, "events"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "credentials are needed" in r.stderr
