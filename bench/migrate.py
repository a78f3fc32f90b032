#!/usr/bin/env python
"""Ferry vs its peers, side by side, in one run: bulk copy throughput and worker memory.

What it measures, on the same generated data and in the same run (tools alternate,
each measurement repeated --runs times, medians reported):

  small files   local -> local  Ferry `migrate --keep-source`  vs `rclone copy --checksum`
                local -> S3     Ferry                           vs `rclone copy --checksum`
  large files   local -> local  Ferry                           vs `cp -r` (and rclone, for information)
                local -> S3     Ferry                           vs `rclone copy --checksum`
  peak RSS of the celery worker processes (main + pool children) during the Ferry runs
  submit_100k   POST /v1/jobs with 100 000 keys, until it answers 202

Ferry runs in its real cluster mode: a fresh Postgres database (dropped at the end),
a Redis database (flushed at start and end), the gunicorn API and one celery worker
(concurrency 2) on the backend queues, all started with the commands of
ferry.cli.launch. The S3 peer is moto_server on loopback, for Ferry and rclone alike.

Ferry's wall time runs from POST /v1/jobs to the job seen in a terminal state (polled
every 0.1 s); the job must have succeeded with every item done, and the destination
must hold every file with the right total size, or the bench fails. Each run writes to
a fresh destination prefix/directory. S3 copies and local large files are deleted right
after the check; local trees of small files stay until the end (about 2 GB at full size),
because on this kind of file system mass deletions make every file creation of the next
minutes slow (see Bench.check_local). For the same reason the bench first waits, up to
--settle-seconds, until creating a file is cheap, and reports that cost (fs_create_us).

Progress goes to stderr; the last line on stdout is one JSON object with the figures.
Throughput units: objects/s, and MiB/s (2**20 bytes) for the *_mb_per_s keys.

Usage (from the repo root, with the venv):
  .venv/bin/python bench/migrate.py                      # full size: 10 000 small, 4 x 256 MiB, 3 runs
  .venv/bin/python bench/migrate.py --small 500 --large-count 2 --large-mib 16 --runs 1   # quick check
  .venv/bin/python bench/migrate.py --no-s3 --large-count 0 --submit-keys 1000           # small files only

Needs: Postgres on 127.0.0.1:5432 (user postgres), Redis on 127.0.0.1:6379, rclone
(`apt-get install -y rclone`), and the test extras in the venv (moto[server], boto3).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.fixtures

import common  # noqa: E402 - bench/common.py, beside this script

from ferry.cli.launch import ProcessGroup
from ferry.settings import Settings
from tests.fixtures.s3peer import TEST_ENV

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20
TERMINAL = ("succeeded", "failed", "partially_failed", "cancelled")
BUCKET = "ferry-bench"
RCLONE_REMOTE = "ferrybenchs3"

# Dummy credentials for the moto peer with the user's AWS configuration kept out (the
# environment the tests use), so nothing here can reach real AWS. None removes a variable.
AWS_ENV = TEST_ENV


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A measurement that cannot be trusted, or a set-up that failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- data -----------------------------------------------------------------------------


def generate(src: Path, n_small: int, n_large: int, large_mib: int, seed: int) -> dict[str, Any]:
    """Small files of 1-64 KiB under small/NNN/ (100 per directory), large under large/."""
    rng = random.Random(seed)
    small_bytes = 0
    for i in range(n_small):
        size = rng.randint(1024, 64 * 1024)
        d = src / "small" / f"{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.bin").write_bytes(os.urandom(size))
        small_bytes += size
    (src / "large").mkdir(parents=True, exist_ok=True)
    for i in range(n_large):
        with open(src / "large" / f"large-{i:02d}.bin", "wb") as f:
            left = large_mib * MiB
            while left:
                n = min(left, 8 * MiB)
                f.write(os.urandom(n))
                left -= n
    return {"small_files": n_small, "small_bytes": small_bytes, "large_files": n_large,
            "large_bytes": n_large * large_mib * MiB}


def create_cost_us(directory: Path, n: int = 500) -> float:
    """Microseconds to create one empty file in `directory` (files kept: see check_local)."""
    directory.mkdir(parents=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(directory / f"probe-{i:04d}", flags, 0o600))
    return (time.perf_counter() - t0) / n * 1e6


def tree_stats(root: Path) -> tuple[int, int]:
    """(files, bytes) under a local directory."""
    n = total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            n += 1
            total += os.stat(os.path.join(dirpath, name)).st_size
    return n, total


# -- services -------------------------------------------------------------------------


class Postgres:
    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.dbname = f"ferry_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.created = False

    def _connect(self):
        import psycopg

        try:
            return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            raise BenchError(f"Postgres is not reachable at {self.admin_url} ({exc}); start it with "
                             "`pg_ctlcluster $(ls /etc/postgresql) main start`") from exc

    def create(self) -> str:
        with self._connect() as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}"')
        self.created = True
        return self.admin_url.rsplit("/", 1)[0] + f"/{self.dbname}"

    def drop(self) -> None:
        if self.created:
            with self._connect() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
            self.created = False


def pick_redis_db(base: str, wanted: int | None) -> int:
    """An empty Redis database: the one asked for, else 0, else the highest empty one.
    (The test suite uses 1 + pid % 15, so 0 is the least likely to be taken.)"""
    import redis

    try:
        if wanted is not None:
            return wanted
        for db in [0, *range(15, 0, -1)]:
            if redis.Redis.from_url(f"{base}/{db}", socket_timeout=5).dbsize() == 0:
                return db
    except redis.RedisError as exc:
        raise BenchError(f"Redis is not reachable at {base} ({exc}); start redis-server") from exc
    raise BenchError("no empty Redis database among 0..15; pass --redis-db N")


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer: the server is up
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{url} did not answer within {timeout:.0f}s")


# -- worker memory ---------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Samples the RSS of a process tree every `interval` while a phase is set; keeps
    the peak of any single process and the peak of the sum, overall and by phase."""

    def __init__(self, root_pid: int, interval: float = 0.1):
        super().__init__(name="rss-sampler", daemon=True)
        self.root_pid = root_pid
        self.interval = interval
        self.phase: str | None = None
        self.stop_event = threading.Event()
        self.peak_single = 0
        self.peak_total = 0
        self.by_phase: dict[str, dict[str, int]] = {}
        self.samples = 0
        self.max_procs = 0

    def run(self) -> None:
        pids: list[int] = []
        last_scan = 0.0
        while not self.stop_event.wait(self.interval):
            phase = self.phase
            if phase is None:
                continue
            now = time.monotonic()
            if now - last_scan > 1.0 or not pids:
                pids = process_tree(self.root_pid)
                last_scan = now
            values = [v for v in (rss_kib(p) for p in pids) if v is not None]
            if len(values) < len(pids):
                last_scan = 0.0  # a process went away: rescan next time
            if not values:
                continue
            single, total = max(values), sum(values)
            self.samples += 1
            self.max_procs = max(self.max_procs, len(values))
            self.peak_single = max(self.peak_single, single)
            self.peak_total = max(self.peak_total, total)
            ph = self.by_phase.setdefault(phase, {"single_kib": 0, "total_kib": 0})
            ph["single_kib"] = max(ph["single_kib"], single)
            ph["total_kib"] = max(ph["total_kib"], total)


# -- the bench --------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="ferry-bench-", dir=base))
        self.src = self.work / "src"
        self.dst = self.work / "dst"
        self.logs = self.work / "logs"
        for d in (self.src, self.dst, self.logs, self.work / "parked"):
            d.mkdir(parents=True)
        self.pg = Postgres(args.postgres)
        self.redis_url: str | None = None
        self.procs: ProcessGroup | None = None
        self.sampler: RssSampler | None = None
        self.api = None
        self.s3 = None
        self.s3_url: str | None = None
        self.results: dict[str, list[float]] = {}
        self.data: dict[str, Any] = {}

    # -- set-up ---------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k, v in AWS_ENV.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def write_backends(self) -> Path:
        import yaml

        backends = [
            {"name": "src", "driver": "local", "settings": {"root": str(self.src)}},
            {"name": "dst", "driver": "local", "settings": {"root": str(self.dst)}},
            {"name": "s3", "driver": "s3",
             "settings": {"bucket": BUCKET, "endpoint_url": self.s3_url,
                          "access_key_id": {"env": "AWS_ACCESS_KEY_ID"},
                          "secret_access_key": {"env": "AWS_SECRET_ACCESS_KEY"}}},
            # No worker consumes this backend's queue: the 100k-key submission targets it,
            # so measuring the API does not set workers churning through missing files.
            {"name": "parked", "driver": "local", "settings": {"root": str(self.work / "parked")}},
        ]
        path = self.work / "backends.yaml"
        path.write_text(yaml.safe_dump({"backends": backends}))
        return path

    def start_moto(self, env: dict[str, str]) -> None:
        exe = Path(sys.executable).parent / "moto_server"
        if not exe.exists():
            raise BenchError(f"{exe} not found: install the test extras (pip install -e '.[test]')")
        port = free_port()
        self.s3_url = f"http://127.0.0.1:{port}"
        self.procs.start("moto", [str(exe), "-H", "127.0.0.1", "-p", str(port)])
        wait_http(self.s3_url + "/moto-api/", 30)
        import boto3

        self.s3 = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                        region_name="us-east-1").client("s3", endpoint_url=self.s3_url)
        self.s3.create_bucket(Bucket=BUCKET)

    def setup(self) -> None:
        a = self.args
        say(f"workdir {self.work}")
        t = time.monotonic()
        self.data = generate(self.src, a.small, a.large_count, a.large_mib, a.seed)
        say(f"generated {a.small} small files ({self.data['small_bytes'] / MiB:.1f} MiB) and "
            f"{a.large_count} x {a.large_mib} MiB in {time.monotonic() - t:.1f}s")

        db_url = self.pg.create()
        redis_db = pick_redis_db(a.redis, a.redis_db)
        self.redis_url = f"{a.redis}/{redis_db}"
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()
        say(f"database {self.pg.dbname}, broker {self.redis_url}")

        env = self.env()
        self.procs = ProcessGroup(self.logs, env)
        self.start_moto(env)
        env.update({
            "FERRY_DATA_DIR": str(self.work / "data"),
            "FERRY_DATABASE_URL": db_url,
            "FERRY_BROKER_URL": self.redis_url,
            "FERRY_BACKENDS_FILE": str(self.write_backends()),
        })
        if a.batch_items:
            env["FERRY_BATCH_ITEMS"] = str(a.batch_items)
        env.pop("FERRY_API_KEY", None)
        os.environ.clear()
        os.environ.update(env)
        self.procs.env = env

        # Imported only now: ferry reads its settings from the environment set above.
        from ferry.catalog.migrate import upgrade
        from ferry.cli import launch
        from ferry.settings import get_settings

        get_settings.cache_clear()
        upgrade()
        from ferry.catalog.db import transaction
        from ferry.catalog.models import Role
        from ferry.security import create_key

        with transaction() as session:  # the bench's own admin key (the API needs credentials)
            _, self.key = create_key(session, name="bench", role=Role.admin)
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.procs.start("api", launch.api_command(f"127.0.0.1:{port}", workers=2, threads=4))
        launch.wait_ready(self.api_url, timeout=60)
        queues = [q for q in launch.all_queues(get_settings()) if q != "backend.parked"]
        worker = self.procs.start("worker", launch.worker_command(queues, a.concurrency, "bench@%h"))
        self.procs.wait_for_log("worker", "ready.", timeout=60)
        say(f"API at {self.api_url}; worker -c {a.concurrency} on {','.join(queues)}")

        import httpx

        self.api = httpx.Client(base_url=self.api_url, timeout=600, headers={"Authorization": f"Bearer {self.key}"})
        self.sampler = RssSampler(worker.pid)
        self.sampler.start()

    # -- Ferry ----------------------------------------------------------------------

    def ferry(self, phase: str, src_prefix: str, target: str, dest_prefix: str, n: int, nbytes: int) -> float:
        body = {"kind": "migrate", "keep_source": True,
                "source": {"backend": "src", "prefix": src_prefix},
                "targets": [{"backend": target, "prefix": dest_prefix}]}
        self.sampler.phase = phase
        t0 = time.perf_counter()
        try:
            r = self.api.post("/v1/jobs", json=body)
            if r.status_code != 202:
                raise BenchError(f"POST /v1/jobs answered {r.status_code}: {r.text[:2000]}")
            job_id = r.json()["id"]
            deadline = time.monotonic() + self.args.job_timeout
            while True:
                job = self.api.get(f"/v1/jobs/{job_id}").json()
                if job["state"] in TERMINAL:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"job {job_id} not finished after {self.args.job_timeout}s: {job}")
                time.sleep(0.1)
            elapsed = time.perf_counter() - t0
        finally:
            self.sampler.phase = None
        items = job["items"]
        if job["state"] != "succeeded" or job["total"] != n or items["done"] != n:
            failed = self.api.get(f"/v1/jobs/{job_id}/items", params={"state": "failed", "limit": 5}).json()
            raise BenchError(f"ferry {phase}: job {job_id} ended {job['state']} with items {items} "
                             f"(expected {n} done); error {job['error']}; failed items: {failed}")
        if job["bytes"]["done"] != nbytes:
            raise BenchError(f"ferry {phase}: job reports {job['bytes']['done']} bytes done, expected {nbytes}")
        return elapsed

    # -- peers ----------------------------------------------------------------------

    def rclone_env(self) -> dict[str, str]:
        env = self.env()
        p = f"RCLONE_CONFIG_{RCLONE_REMOTE.upper()}_"
        env.update({p + "TYPE": "s3", p + "PROVIDER": "Other", p + "ENDPOINT": self.s3_url,
                    p + "ACCESS_KEY_ID": "testing", p + "SECRET_ACCESS_KEY": "testing",
                    p + "REGION": "us-east-1", p + "FORCE_PATH_STYLE": "true", p + "ENV_AUTH": "false"})
        env["RCLONE_CONFIG"] = os.devnull  # only the remote above, never the user's config
        return env

    def run_tool(self, argv: list[str], env: dict[str, str] | None = None) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout.decode()[-4000:]}")
        return elapsed

    def rclone(self, src: Path, dest: str) -> float:
        return self.run_tool(["rclone", "copy", "--checksum", *self.args.rclone_flag, str(src), dest],
                             env=self.rclone_env())

    # -- destinations ---------------------------------------------------------------

    def check_local(self, what: str, d: Path, n: int, nbytes: int, *, delete: bool) -> None:
        """Check a local destination; delete it now, or leave it for the end.

        Trees of many small files are kept until the end of the bench: on ext4 without a
        journal (as here), creating a file skips the inodes deleted in the last 60-300 s
        (ext4 find_inode_bit -> recently_deleted), and after 10 000 deletions every create
        costs about 1 ms of kernel CPU: deleting between runs would slow down whichever tool
        runs next. The few large files are deleted at once (disk space).
        """
        got = tree_stats(d)
        if got != (n, nbytes):
            raise BenchError(f"{what}: {d} holds {got[0]} files / {got[1]} bytes, expected {n} / {nbytes}")
        if delete:
            shutil.rmtree(d)

    def check_s3(self, what: str, prefix: str, n: int, nbytes: int) -> None:
        keys, total = [], 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for obj in page.get("Contents", ()):
                keys.append(obj["Key"])
                total += obj["Size"]
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                          "Quiet": True})
        if (len(keys), total) != (n, nbytes):
            raise BenchError(f"{what}: s3://{BUCKET}/{prefix} holds {len(keys)} objects / {total} bytes, "
                             f"expected {n} / {nbytes}")

    # -- measurements ---------------------------------------------------------------

    def record(self, name: str, seconds: float, amount: float, unit: str) -> None:
        rate = amount / seconds
        self.results.setdefault(name, []).append(rate)
        say(f"  {name:<30} {seconds:8.2f}s  {rate:10.1f} {unit}")

    def measure(self, run: int) -> None:
        d = self.data
        ns, bs = d["small_files"], d["small_bytes"]
        nl, bl = d["large_files"], d["large_bytes"]
        tag = f"r{run}-{uuid.uuid4().hex[:6]}"

        def ferry_small_local():
            p = f"ferry-small-{tag}"
            t = self.ferry("small_local", "small/", "dst", p + "/", ns, bs)
            self.check_local("ferry small", self.dst / p, ns, bs, delete=False)
            self.record("small_objects_per_s", t, ns, "obj/s")

        def rclone_small_local():
            p = self.dst / f"rclone-small-{tag}"
            t = self.rclone(self.src / "small", str(p))
            self.check_local("rclone small", p, ns, bs, delete=False)
            self.record("rclone_small_objects_per_s", t, ns, "obj/s")

        def ferry_small_s3():
            p = f"ferry-small-{tag}/"
            t = self.ferry("small_s3", "small/", "s3", p, ns, bs)
            self.check_s3("ferry small s3", p, ns, bs)
            self.record("s3_small_objects_per_s", t, ns, "obj/s")

        def rclone_small_s3():
            p = f"rclone-small-{tag}/"
            t = self.rclone(self.src / "small", f"{RCLONE_REMOTE}:{BUCKET}/{p}")
            self.check_s3("rclone small s3", p, ns, bs)
            self.record("s3_rclone_small_objects_per_s", t, ns, "obj/s")

        def ferry_large_local():
            p = f"ferry-large-{tag}"
            t = self.ferry("large_local", "large/", "dst", p + "/", nl, bl)
            self.check_local("ferry large", self.dst / p, nl, bl, delete=True)
            self.record("large_mb_per_s", t, bl / MiB, "MiB/s")

        def cp_large_local():
            p = self.dst / f"cp-large-{tag}"
            t = self.run_tool(["cp", "-r", str(self.src / "large"), str(p)])
            self.check_local("cp large", p, nl, bl, delete=True)
            self.record("cp_large_mb_per_s", t, bl / MiB, "MiB/s")

        def rclone_large_local():
            p = self.dst / f"rclone-large-{tag}"
            t = self.rclone(self.src / "large", str(p))
            self.check_local("rclone large", p, nl, bl, delete=True)
            self.record("rclone_large_mb_per_s", t, bl / MiB, "MiB/s")

        def ferry_large_s3():
            p = f"ferry-large-{tag}/"
            t = self.ferry("large_s3", "large/", "s3", p, nl, bl)
            self.check_s3("ferry large s3", p, nl, bl)
            self.record("s3_large_mb_per_s", t, bl / MiB, "MiB/s")

        def rclone_large_s3():
            p = f"rclone-large-{tag}/"
            t = self.rclone(self.src / "large", f"{RCLONE_REMOTE}:{BUCKET}/{p}")
            self.check_s3("rclone large s3", p, nl, bl)
            self.record("s3_rclone_large_mb_per_s", t, bl / MiB, "MiB/s")

        groups = [[ferry_small_local, rclone_small_local], [ferry_small_s3, rclone_small_s3],
                  [ferry_large_local, cp_large_local, rclone_large_local], [ferry_large_s3, rclone_large_s3]]
        for group in groups:
            if nl == 0 and group[0].__name__.startswith("ferry_large"):
                continue
            if self.args.no_s3 and group[0].__name__.endswith("_s3"):
                continue
            # Alternate who goes first from run to run, so warm-cache effects cancel out.
            k = (run - 1) % len(group)
            for fn in group[k:] + group[:k]:
                self.procs.check_alive()
                fn()

    def submit_100k(self, run: int) -> None:
        n = self.args.submit_keys
        body = {"kind": "migrate", "keep_source": True,
                "source": {"backend": "src", "keys": [f"void/r{run}/{i:07d}.bin" for i in range(n)]},
                "targets": [{"backend": "parked", "prefix": ""}]}
        payload = json.dumps(body).encode()
        t0 = time.perf_counter()
        r = self.api.post("/v1/jobs", content=payload, headers={"Content-Type": "application/json"})
        elapsed = time.perf_counter() - t0
        if r.status_code != 202:
            raise BenchError(f"POST /v1/jobs with {n} keys answered {r.status_code}: {r.text[:2000]}")
        job_id = r.json()["id"]
        c = self.api.post(f"/v1/jobs/{job_id}/cancel")
        if c.status_code != 200:
            raise BenchError(f"cancelling job {job_id} answered {c.status_code}: {c.text[:500]}")
        total = c.json()["total"]
        if total != n:
            raise BenchError(f"the {n}-key job holds {total} items")
        self.results.setdefault("submit_100k_s", []).append(elapsed)
        say(f"  {f'submit_{n}_keys':<30} {elapsed:8.2f}s  ({len(payload) / MiB:.1f} MiB body)")

    def settle(self) -> float:
        """Wait (up to --settle-seconds) until creating a file is cheap again: mass deletions
        shortly before (an earlier bench's clean-up, other jobs) make every create scan the
        recently deleted inodes (see check_local), which would skew the first runs."""
        t0 = time.monotonic()
        good = 0
        for i in range(10_000):
            # New directories land in different inode groups, so one probe is noisy: two
            # cheap probes in a row count as settled.
            cost = create_cost_us(self.work / f"probe-settle-{i}", 200)
            good = good + 1 if cost <= self.args.settle_us else 0
            waited = time.monotonic() - t0
            if good >= 2 or waited >= self.args.settle_seconds:
                if waited > 1:
                    say(f"file creation settled at {cost:.0f} us after {waited:.0f}s")
                return round(waited, 1)
            if i == 0 and good == 0:
                say(f"creating a file costs {cost:.0f} us (recent mass deletions?); waiting for it to settle")
            time.sleep(5)
        return round(time.monotonic() - t0, 1)

    def warm_up(self) -> None:
        """One small job per destination first: a cluster is long-lived, and the first
        task of a pool child pays its imports and connections."""
        say("warm-up")
        n = min(100, self.data["small_files"])
        sizes = sum(os.stat(p).st_size for p in (self.src / "small" / "000").iterdir())
        for target in ("dst",) if self.args.no_s3 else ("dst", "s3"):
            self.ferry("warmup", "small/000/", target, "warmup/", n, sizes)
        # The local warm-up copy stays until the end: see check_local on deleting files.
        if not self.args.no_s3:
            self.check_s3("warm-up", "warmup/", n, sizes)

    def run(self) -> dict[str, Any]:
        t_start = time.monotonic()
        self.load_start = os.getloadavg()
        self.setup()
        self.settled_s = self.settle()
        self.fs_create_us = [round(create_cost_us(self.work / "probe-start"), 1)]
        say(f"creating a file costs {self.fs_create_us[0]:.0f} us here")
        self.warm_up()
        for run in range(1, self.args.runs + 1):
            say(f"run {run}/{self.args.runs}")
            self.measure(run)
        say("submit: POST /v1/jobs with many keys")
        for run in range(1, self.args.runs + 1):
            self.submit_100k(run)
        self.fs_create_us.append(round(create_cost_us(self.work / "probe-end"), 1))
        return self.report(time.monotonic() - t_start)

    def report(self, wall: float) -> dict[str, Any]:
        med = {k: statistics.median(v) for k, v in self.results.items()}

        def ratio(a: str, b: str) -> float | None:
            return round(med[a] / med[b], 3) if a in med and b in med else None

        def r2(key: str) -> float | None:
            return round(med[key], 2) if key in med else None

        s = self.sampler
        out: dict[str, Any] = {
            "small_objects_per_s": r2("small_objects_per_s"),
            "rclone_small_objects_per_s": r2("rclone_small_objects_per_s"),
            "ratio_small": ratio("small_objects_per_s", "rclone_small_objects_per_s"),
            "large_mb_per_s": r2("large_mb_per_s"),
            "cp_large_mb_per_s": r2("cp_large_mb_per_s"),
            "ratio_large": ratio("large_mb_per_s", "cp_large_mb_per_s"),
            "rclone_large_mb_per_s": r2("rclone_large_mb_per_s"),
            "peak_worker_rss_mib": round(s.peak_single / 1024, 1),
            "peak_worker_rss_total_mib": round(s.peak_total / 1024, 1),
            "submit_100k_s": round(med["submit_100k_s"], 3),
            "s3_small_objects_per_s": r2("s3_small_objects_per_s"),
            "s3_rclone_small_objects_per_s": r2("s3_rclone_small_objects_per_s"),
            "s3_ratio_small": ratio("s3_small_objects_per_s", "s3_rclone_small_objects_per_s"),
            "s3_large_mb_per_s": r2("s3_large_mb_per_s"),
            "s3_rclone_large_mb_per_s": r2("s3_rclone_large_mb_per_s"),
            "s3_ratio_large": ratio("s3_large_mb_per_s", "s3_rclone_large_mb_per_s"),
            "peak_worker_rss_by_phase_mib": {
                k: {"single": round(v["single_kib"] / 1024, 1), "total": round(v["total_kib"] / 1024, 1)}
                for k, v in s.by_phase.items()},
            "runs": self.args.runs,
            "small_files": self.data["small_files"],
            "small_mib": round(self.data["small_bytes"] / MiB, 1),
            "large_files": self.data["large_files"],
            "large_file_mib": self.args.large_mib,
            "submit_keys": self.args.submit_keys,
            "cores": os.cpu_count(),
            "worker_concurrency": self.args.concurrency,
            "batch_items": Settings().batch_items,
            "batch_bytes": Settings().batch_bytes,
            "rss_samples": s.samples,
            "worker_processes": s.max_procs,
            "rclone_version": rclone_version(),
            "rclone_flags": ["copy", "--checksum", *self.args.rclone_flag],
            "python": platform.python_version(),
            "git_commit": git_commit(),
            "mb_unit": "MiB",
            "raw": {k: [round(x, 3) for x in v] for k, v in self.results.items()},
            # File creation cost on the work dir's file system, at start and end (see check_local).
            "fs_create_us": self.fs_create_us,
            "settle_wait_s": self.settled_s,
            # Other work on the machine skews every figure: the load averages show it.
            "loadavg_start": [round(x, 2) for x in self.load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "bench_wall_s": round(wall, 1),
        }
        return out

    # -- tear-down ------------------------------------------------------------------

    def cleanup(self) -> None:
        # A second Ctrl-C or SIGTERM must not cut the tear-down short and leak processes.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if self.sampler is not None:
            self.sampler.stop_event.set()
        if self.api is not None:
            self.api.close()
        if self.procs is not None:
            self.procs.stop()
        try:
            self.pg.drop()  # WITH (FORCE): connections still open (ours included) are closed
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
            say(f"could not drop database {self.pg.dbname}: {exc}")
        if self.redis_url:
            try:
                import redis

                redis.Redis.from_url(self.redis_url, socket_timeout=5).flushdb()
            except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
                say(f"could not flush {self.redis_url}: {exc}")
        if self.args.keep:
            say(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def rclone_version() -> str | None:
    try:
        return subprocess.run(["rclone", "version"], capture_output=True, text=True,
                              check=False).stdout.split("\n")[0]
    except OSError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False)
        return out.stdout.strip() or None
    except OSError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=10_000, help="number of small files (1-64 KiB)")
    p.add_argument("--large-count", type=int, default=4, help="number of large files")
    p.add_argument("--large-mib", type=int, default=256, help="size of each large file, MiB")
    p.add_argument("--runs", type=int, default=3, help="repetitions of each measurement (medians reported)")
    p.add_argument("--submit-keys", type=int, default=100_000, help="keys in the submit measurement")
    p.add_argument("--settle-seconds", type=float, default=300,
                   help="wait at most this long for file creation to get cheap before measuring")
    p.add_argument("--settle-us", type=float, default=150, help="file creation cost counted as settled")
    p.add_argument("--no-s3", action="store_true", help="skip the local -> S3 measurements (quick checks)")
    p.add_argument("--concurrency", type=int, default=2, help="celery worker pool size")
    p.add_argument("--batch-items", type=int, default=None, help="FERRY_BATCH_ITEMS for the cluster")
    p.add_argument("--workdir", default=None, help="where to create the temp dir (default: the system tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) at the end")
    p.add_argument("--seed", type=int, default=1, help="seed of the small files' sizes")
    p.add_argument("--postgres", default=os.environ.get("FERRY_BENCH_POSTGRES",
                                                        "postgresql://postgres@127.0.0.1:5432/postgres"),
                   help="admin URL; a fresh database is created next to it and dropped at the end")
    p.add_argument("--redis", default=os.environ.get("FERRY_BENCH_REDIS", "redis://127.0.0.1:6379"))
    p.add_argument("--redis-db", type=int, default=None, help="Redis db to use (flushed); default: an empty one")
    p.add_argument("--job-timeout", type=float, default=3600, help="seconds before a Ferry job counts as hung")
    p.add_argument("--rclone-flag", action="append", default=[],
                   help="extra rclone flag (repeatable), e.g. --rclone-flag=--transfers=2")
    args = p.parse_args(argv)
    if args.small < 100:
        p.error("--small must be at least 100 (the warm-up copies the first 100)")
    if args.runs < 1 or args.large_count < 0 or args.large_mib < 1:
        p.error("--runs and --large-mib must be >= 1, --large-count >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("rclone") is None:
        print("bench: rclone not found on PATH; install it with `apt-get install -y rclone`", file=sys.stderr)
        return 2
    if shutil.which("cp") is None:
        print("bench: cp not found on PATH", file=sys.stderr)
        return 2

    bench = Bench(args)
    return common.run(bench, lambda: (bench.procs,), say)


if __name__ == "__main__":
    sys.exit(main())
