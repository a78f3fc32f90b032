"""The embedded default, as the Quick start runs it: `ferry serve` with a SQLite catalog,
the filesystem broker and two local disks, no server at all."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.cli.launch import ProcessGroup, wait_ready
from tests.fixtures.cluster import free_port

pytestmark = pytest.mark.e2e

FERRY = str(Path(sys.executable).parent / "ferry")


def test_serve_and_migrate_without_servers(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    port = free_port()
    env.update(FERRY_DATA_DIR=str(tmp_path / "home"), FERRY_API_URL=f"http://127.0.0.1:{port}")
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
    finally:
        serve.send_signal(signal.SIGINT)  # as Ctrl-C: serve stops its children and exits 0
        serve.wait(timeout=60)
    assert serve.returncode == 0, group.logs("serve")
    for key, sha in digests.items():
        moved = tmp_path / "home" / "disks" / "archive" / "photos" / key
        assert hashlib.sha256(moved.read_bytes()).hexdigest() == sha
    assert not any(p.is_file() for p in photos.rglob("*"))
    assert (tmp_path / "home" / "ferry.db").exists()
