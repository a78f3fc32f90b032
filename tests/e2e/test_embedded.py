"""The embedded default, as the Quick start runs it: `ferry serve` with a SQLite catalog,
the filesystem broker and two local disks, no server at all."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ferry.cli.launch import ProcessGroup, wait_ready
from tests.fixtures.cluster import free_port

pytestmark = pytest.mark.e2e

FERRY = str(Path(sys.executable).parent / "ferry")


def test_serve_and_migrate_without_servers(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    port = free_port()
    env.update(FERRY_DATA_DIR=str(tmp_path / "home"), FERRY_API_URL=f"http://127.0.0.1:{port}",
               FERRY_RECONCILE_INTERVAL_SECONDS="1")
    photos = tmp_path / "home" / "disks" / "local" / "photos"
    digests = {}
    for i in range(40):
        data = os.urandom(i * 7919)
        (photos / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (photos / f"d{i % 3}" / f"{i}.jpg").write_bytes(data)
        digests[f"d{i % 3}/{i}.jpg"] = hashlib.sha256(data).hexdigest()

    group = ProcessGroup(tmp_path / "logs", env)
    serve = group.start("serve", [FERRY, "serve", "--port", str(port), "--log-dir", str(tmp_path / "logs")])
    try:
        wait_ready(env["FERRY_API_URL"], timeout=90)
        r = subprocess.run([FERRY, "migrate", "local:photos/", "archive:photos/", "--json"], env=env,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, (r.stdout, r.stderr)
        # A policy on the embedded catalog: two replicas of everything under archive:photos/.
        policy = tmp_path / "two.yaml"
        policy.write_text("name: two\nselector: {backend: archive, prefix: photos/}\n"
                          "placement: {backends: '*', replicas: 2}\n")
        r = subprocess.run([FERRY, "policy", "apply", "-f", str(policy)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = subprocess.run([FERRY, "policy", "status", "two", "--json"], env=env, capture_output=True, text=True)
            if r.returncode == 0 and json.loads(r.stdout)["converged"] == 40:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the embedded policy did not converge: {r.stdout} {r.stderr}")
        r = subprocess.run([FERRY, "verify", "local:photos/"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "40 ok" in r.stdout, (r.stdout, r.stderr)
        # Safe by default: the first start made an admin key, 0600, that the CLI above used;
        # without it the API answers 401 (health checks only are open).
        key_file = tmp_path / "home" / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.read_text().startswith("fy_")
        assert httpx.get(env["FERRY_API_URL"] + "/v1/jobs", timeout=10).status_code == 401
        assert httpx.get(env["FERRY_API_URL"] + "/healthz", timeout=10).status_code == 200
        # Others may not read the key: the CLI refuses to use it, saying how to fix it.
        key_file.chmod(0o644)
        r = subprocess.run([FERRY, "events"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "chmod 600" in r.stderr, (r.stdout, r.stderr)
        key_file.chmod(0o600)
    finally:
        serve.send_signal(signal.SIGINT)  # as Ctrl-C: serve stops its children and exits 0
        serve.wait(timeout=60)
    assert serve.returncode == 0, group.logs("serve")
    for key, sha in digests.items():
        moved = tmp_path / "home" / "disks" / "archive" / "photos" / key
        assert hashlib.sha256(moved.read_bytes()).hexdigest() == sha
    for key, sha in digests.items():  # copied back by the policy, under the same keys
        assert hashlib.sha256((photos / key).read_bytes()).hexdigest() == sha
    assert (tmp_path / "home" / "ferry.db").exists()


def test_serve_on_an_open_address_without_credentials_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(FERRY_DATA_DIR=str(tmp_path / "home"))
    r = subprocess.run([FERRY, "serve", "--host", "0.0.0.0", "--port", str(free_port())], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no credentials configured" in r.stderr, (r.stdout, r.stderr)
    assert not (tmp_path / "home" / "admin.key").exists()
    r = subprocess.run([FERRY, "api", "--bind", f"0.0.0.0:{free_port()}"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "no credentials configured" in r.stderr, (r.stdout, r.stderr)
