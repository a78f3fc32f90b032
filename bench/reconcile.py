#!/usr/bin/env python
"""Ferry's reconcile pass over a large catalog, and its scrub throughput next to sha256sum.

Two measurements, in one run:

  reconcile   one pass (tasks.reconcile.run_pass) over --objects catalogued objects
              (default 1 000 000) and three continuous policies, on Postgres, with the
              catalog converged: the pass must find no work. Each pass runs in a fresh
              child process, so its peak RSS is the pass's own (VmHWM at its end; see
              child_pass on why not ru_maxrss alone). --runs passes, median reported;
              the first is also timed query by query (where the time goes); a first pass
              over --budget-s is not repeated. Then one pass with
              FERRY_RECONCILE_BATCH_OBJECTS=250000 and, last, one pass that finds work:
              1 % of the replicas marked `bad`, to be repaired (timed by query too).
  scrub       one real celery worker (concurrency 1) verifies --scrub-mib of files on one
              local backend (a verify job over a prefix: list the catalog, read, sha256,
              record), against `sha256sum` over the same files. Both read from the page
              cache (the files are read once before), and they alternate:
              sha256sum, scrub, sha256sum, scrub, ... (--runs each), medians reported.
              `openssl dgst -sha256` runs in the same rotation, for information: here
              sha256sum does not use the CPU's SHA instructions, OpenSSL (and hashlib) do.

Targets (issue): a pass over 1M objects and 3 policies under 30 s and 500 MiB; one
worker's scrub at least 0.9 of sha256sum on the same files.

The catalog lives in its own database (ferry_bench_reconcile, dropped and recreated,
dropped at the end) and is filled with COPY, not the ORM. Four local backends:
hot-a {tier: hot, zone: a}, hot-b {tier: hot, zone: b}, cold-a and cold-b (tier: cold).
Objects are a third `dataset` (2 replicas, hot-a + hot-b), a third `logs` (1 replica on
a hot backend, or on a cold one when older than 180 days), a third untagged (hot-a +
hot-b, placed by hand); created over the past 2 years, verified in the last 20 days.
The policies' selectors are checked to match those objects before anything is timed.
The broker is Redis db 14 (flushed at start and end).

Progress goes to stderr; the last line on stdout is one JSON object. Throughput is in
MB/s with MB = 10**6 bytes (`mb_unit`); memory in MiB (2**20 bytes).

Usage (from the repo root, with the venv):
  .venv/bin/python bench/reconcile.py                                  # full size (~5 min)
  .venv/bin/python bench/reconcile.py --objects 20000 --scrub-mib 256  # quick check (~20 s)

Needs: Postgres on 127.0.0.1:5432 (user postgres), Redis on 127.0.0.1:6379, sha256sum.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import common  # bench/common.py, beside this script

REPO = Path(__file__).resolve().parent.parent
MB = 10**6
MiB = 2**20
DAY = 86400
DBNAME = "ferry_bench_reconcile"
PASS_APP = "ferry-bench-pass"  # application_name of the passes' database sessions

BACKENDS = [
    ("hot-a", {"tier": "hot", "zone": "a"}),
    ("hot-b", {"tier": "hot", "zone": "b"}),
    ("cold-a", {"tier": "cold", "zone": "a"}),
    ("cold-b", {"tier": "cold", "zone": "b"}),
]
SCRUB_BACKEND = "hot-a"
SCRUB_PREFIX = "scrub/"

# The first two policies select by tag (default) or by key prefix (--selectors prefix):
# both pick the same objects here. Each policy's selector is checked to match what it should
# before anything is measured: a policy that matches nothing would make the pass cheap
# and the figure meaningless.
SELECTORS = {"prefix": ('{prefix: "dataset/"}', '{prefix: "logs/"}'),
             "tags": ("{tags: [dataset]}", "{tags: [logs]}")}
POLICIES = [
    """
name: datasets-hot
description: "Datasets: two replicas on hot disks, one per zone, checked monthly"
selector: %(dataset)s
placement: {backends: "tier=hot", replicas: 2, spread: zone}
verification: {every: 30d}
""",
    """
name: logs-tiered
description: "Logs: one hot replica, moved to cold storage after 180 days, deleted after 3 years"
selector: %(logs)s
placement: {backends: "tier=hot", replicas: 1}
transitions:
  - {after: 180d, since: creation, to: "tier=cold"}
retention: {delete_after: 1095d}
""",
    """
name: scrub-everything
description: "Every object: every replica re-read and checked every 90 days"
selector: {}
verification: {every: 90d}
""",
]
# The data below must stay converged for these: no logs object within this many days of
# the 180-day transition (a pass some minutes after the load must not see one cross it),
# and no replica verified longer ago than this (the tightest interval is 30 days).
TRANSITION_DAYS, TRANSITION_GAP_DAYS = 180, 5
VERIFIED_WITHIN_DAYS = 20
CATALOG_YEARS = 2


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_status_kib(*fields: str) -> dict[str, int]:
    """Memory figures of this process from /proc/self/status (VmRSS, VmHWM...), in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in fields:
                out[name] = int(value.split()[0])
    return out


# -- the child: one reconcile pass in a fresh process -----------------------------------


def instrument() -> dict[str, float]:
    """Time the pass's parts in this process (--profile): each planner query by policy and
    kind, and the steps around them. Only wraps functions; Ferry's code is unchanged."""
    from policies import planner
    from tasks import reconcile

    spent: dict[str, float] = defaultdict(float)
    labels: dict[int, str] = {}

    def timed(label: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - t
        return wrapper

    def labelled(label_of: Any, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            query = fn(*args, **kwargs)
            if query is not None:
                labels[id(query)] = label_of(args)
            return query
        return wrapper

    run_rows = planner.rows

    def rows(session: Any, query: Any, **kwargs: Any) -> Any:
        if query is None:
            return run_rows(session, query, **kwargs)
        label = labels.pop(id(query), "other")
        t = time.perf_counter()
        try:
            return run_rows(session, query, **kwargs)
        finally:
            spent[f"query {label}"] += time.perf_counter() - t

    def wrap(owner: Any, name: str, wrapper: Any, *how: Any) -> None:
        if hasattr(owner, name):  # the code moves on: a name gone is simply not timed
            setattr(owner, name, wrapper(*how, getattr(owner, name)))

    planner.rows = rows
    wrap(planner, "repairs", labelled, lambda a: "repairs")
    wrap(planner, "suspects", labelled, lambda a: "suspects")
    for method in ("copies", "surplus", "expired", "verifications"):
        wrap(planner.PolicyQueries, method, labelled, lambda a, m=method: f"{a[0].policy.name}.{m}")
    for owner, name, label in (
            (planner, "protected", "protected (other policies' wants)"), (planner, "id_range", "id_range"),
            (reconcile._Pass, "mark_lost", "mark_lost (newly_lost, found_again)"),
            (reconcile._Pass, "take", "insert items"), (reconcile, "_housekeeping", "housekeeping"),
            (reconcile, "_budgets", "budgets"), (reconcile, "_open_items_by_policy", "open items by policy"),
            (reconcile, "send_batches", "send messages (after commit)")):
        wrap(owner, name, timed, label)
    return spent


def child_pass(profile: bool) -> int:
    """Run one pass; print its report, time and memory as one JSON line."""
    t0 = time.perf_counter()
    from ferry.settings import get_settings
    from tasks import reconcile

    import_s = time.perf_counter() - t0
    base = proc_status_kib("VmRSS", "VmHWM")
    spent = instrument() if profile else None
    t = time.perf_counter()
    report = reconcile.run_pass()
    seconds = time.perf_counter() - t
    # The peak is VmHWM, the high-water mark of this process's own memory. ru_maxrss says
    # the same only when the process that started us was smaller: Linux carries the
    # parent's RSS at fork into the child's ru_maxrss across exec (it is reported too).
    out = {"seconds": seconds, "report": report, "import_s": import_s,
           "batch_objects": get_settings().reconcile_batch_objects,
           "baseline_rss_kib": base["VmRSS"], "baseline_hwm_kib": base["VmHWM"],
           "peak_rss_kib": proc_status_kib("VmHWM")["VmHWM"],
           "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    if spent is not None:
        out["profile_s"] = {k: round(v, 3) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
        out["profile_s"]["rest (policies, planning in Python, commit)"] = round(seconds - sum(spent.values()), 3)
    print(json.dumps(out, default=str), flush=True)
    return 0


# -- the catalog ------------------------------------------------------------------------


def fake_cid(sha: bytes) -> str:
    """The CIDv1 (raw leaf, base32) of content whose sha256 is `sha`: the real CID of the
    bytes an object here is said to hold, when they fit one chunk (workers/cid.py)."""
    return "b" + base64.b32encode(b"\x01\x55\x12\x20" + sha).decode().lower().rstrip("=")


def ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


class Catalog:
    """Generates the converged catalog of --objects objects and loads it with COPY."""

    OBJECT_COLUMNS = ("id", "cid", "sha256", "size", "media_type", "metadata", "tags", "created_at",
                      "last_accessed_at", "legal_hold", "lost_at")
    REPLICA_COLUMNS = ("object_id", "backend", "key", "state", "verified_at", "created_at", "updated_at")
    TABLES = ("objects", "replicas")

    def __init__(self, n: int, now: float):
        self.n = n
        self.now = now
        self.replicas = 0
        self.kinds: dict[str, int] = defaultdict(int)
        self.spent: dict[str, float] = defaultdict(float)

    def rows(self, span: tuple[int, int]) -> tuple[bytes, bytes, dict[str, int], int]:
        """COPY text of objects first..last-1 and of their replicas; objects by kind; replicas."""
        objects, replicas = [], []
        kinds: dict[str, int] = defaultdict(int)
        years = CATALOG_YEARS * 365 * DAY
        for i in range(*span):
            sha = hashlib.sha256(b"ferry-bench-object-%d" % i).digest()
            h = int.from_bytes(sha[:8])
            age = h % years
            size = 1024 + (h >> 32) % (4 * MiB)
            kind = ("dataset", "logs", "misc")[i % 3]
            if kind == "logs" and abs(age - TRANSITION_DAYS * DAY) < TRANSITION_GAP_DAYS * DAY:
                age -= 2 * TRANSITION_GAP_DAYS * DAY  # keep clear of the transition (see above)
            created = self.now - age
            accessed = ts(created + (h >> 16) % max(1, age)) if i % 4 == 0 else r"\N"
            if kind == "dataset":
                media, meta, tags = "application/octet-stream", f'{{"project": "p{i % 50}"}}', '["dataset"]'
            elif kind == "logs":
                media, meta, tags = "text/plain", '{"source": "app"}', '["logs"]'
            else:
                media, meta, tags = r"\N", "{}", "[]"
            objects.append("\t".join((str(i), fake_cid(sha), sha.hex(), str(size), media, meta, tags, ts(created),
                                      accessed, "f", r"\N")))
            if kind == "logs":
                tier = "cold" if age >= TRANSITION_DAYS * DAY else "hot"
                backends = [f"{tier}-{'ab'[i % 2]}"]
                kind_of = f"logs-{tier}"
            else:
                backends, kind_of = ["hot-a", "hot-b"], kind
            kinds[kind_of] += 1
            for b in backends:
                verified = ts(self.now - (h >> 8) % (VERIFIED_WITHIN_DAYS * DAY))
                replicas.append("\t".join((str(i), b, f"{kind}/{i // 1000:04d}/{i:08d}.bin", "present", verified,
                                           ts(created), verified)))
        return (("\n".join(objects) + "\n").encode(), ("\n".join(replicas) + "\n").encode(), dict(kinds),
                len(replicas))

    def load(self, conninfo: str, chunk: int = 50_000) -> None:
        """Rows are generated in a second process while this one COPYs the previous chunk;
        indexes and constraints other than primary keys are dropped for the load and built
        again after it (from their own definitions, so the schema ends as migrated)."""
        import multiprocessing

        import psycopg

        spans = [(first, min(self.n + 1, first + chunk)) for first in range(1, self.n + 1, chunk)]
        # The generator is forked before the connection is made, so it holds no copy of it.
        with multiprocessing.get_context("fork").Pool(1) as pool, psycopg.connect(conninfo, autocommit=True) as conn:
            restore = self._drop_secondary(conn)
            t = time.perf_counter()
            with conn.cursor() as cur:
                for objects, replicas, kinds, n_replicas in pool.imap(self.rows, spans):
                    for table, columns, data in (("objects", self.OBJECT_COLUMNS, objects),
                                                 ("replicas", self.REPLICA_COLUMNS, replicas)):
                        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                            copy.write(data)
                    for k, v in kinds.items():
                        self.kinds[k] += v
                    self.replicas += n_replicas
                cur.execute("SELECT setval(pg_get_serial_sequence('objects', 'id'), %s)", (self.n,))
            self.spent["generate and copy"] = time.perf_counter() - t
            t = time.perf_counter()
            conn.execute("SET maintenance_work_mem = '512MB'")
            for statement in restore:
                conn.execute(statement)
            self.spent["indexes and constraints"] = time.perf_counter() - t
            # As a catalog in service would be: statistics, visibility map and hint bits set,
            # so a pass does not pay for the load's first reads.
            t = time.perf_counter()
            for table in self.TABLES:
                conn.execute(f"VACUUM (ANALYZE) {table}")
            self.spent["vacuum analyze"] = time.perf_counter() - t

    def _drop_secondary(self, conn: Any) -> list[str]:
        """Drop the tables' foreign keys, unique constraints and plain indexes; return the
        statements that create them again, in order."""
        tables = list(self.TABLES)
        constraints = conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), contype FROM pg_constraint "
            "WHERE conrelid::regclass::text = ANY(%s) AND contype IN ('f', 'u') ORDER BY contype", (tables,)
        ).fetchall()  # 'f' before 'u': foreign keys go first, and come back last
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = ANY(%s) AND indexname NOT IN (SELECT conname FROM pg_constraint)", (tables,)
        ).fetchall()
        for table, name, _definition, _kind in constraints:
            conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        for name, _definition in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        return ([definition for _name, definition in indexes]
                + [f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'
                   for table, name, definition, _kind in reversed(constraints)])


# -- the bench --------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        from migrate import Postgres  # bench/migrate.py: the same database helper

        self.args = args
        base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
        self.work = Path(tempfile.mkdtemp(prefix="ferry-bench-reconcile-", dir=base))
        self.pg = Postgres(args.postgres)
        self.pg.dbname = DBNAME
        self.redis_url = f"{args.redis}/{args.redis_db}"
        self.redis = None
        self.procs = None
        self.out: dict[str, Any] = {}
        self.raw: dict[str, Any] = {}

    # -- set-up ---------------------------------------------------------------------

    def setup(self) -> None:
        import redis
        import yaml

        self.pg.created = True  # a database left by an earlier run goes first
        self.pg.drop()
        db_url = self.pg.create().replace("postgresql://", "postgresql+psycopg://", 1)
        self.conninfo = self.pg.admin_url.rsplit("/", 1)[0] + f"/{DBNAME}"
        self.redis = redis.Redis.from_url(self.redis_url, socket_timeout=10)
        if self.redis.dbsize():
            log(f"{self.redis_url} holds {self.redis.dbsize()} keys; flushing it")
        self.redis.flushdb()
        backends = [{"name": name, "driver": "local", "labels": labels,
                     "settings": {"root": str(self.work / "disks" / name)}} for name, labels in BACKENDS]
        backends_file = self.work / "backends.yaml"
        backends_file.write_text(yaml.safe_dump({"backends": backends}))
        os.environ.pop("FERRY_API_KEY", None)
        os.environ.update({"FERRY_DATABASE_URL": db_url, "FERRY_BROKER_URL": self.redis_url,
                           "FERRY_DATA_DIR": str(self.work / "data"), "FERRY_BACKENDS_FILE": str(backends_file)})
        for name in ("FERRY_RECONCILE_BATCH_OBJECTS", "FERRY_MAX_IN_FLIGHT", "FERRY_BATCH_ITEMS"):
            os.environ.pop(name, None)  # the defaults are what is measured

        # Imported only now: ferry reads its settings from the environment set above.
        from ferry.catalog import policies as stored
        from ferry.catalog.db import transaction
        from ferry.catalog.migrate import upgrade
        from ferry.catalog.replicas import sync_backends
        from ferry.settings import get_settings
        from policies.schema import Policy

        get_settings.cache_clear()
        upgrade()
        with transaction() as session:
            sync_backends(session, get_settings().backends())
            dataset, logs = SELECTORS[self.args.selectors]
            for text in POLICIES:
                policy = Policy.from_yaml(text % {"dataset": dataset, "logs": logs})
                stored.apply(session, policy.name, policy.to_document(), next_run_at=None)
        log(f"database {DBNAME}, broker {self.redis_url}, work dir {self.work}")

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    # -- reconcile ------------------------------------------------------------------

    def load(self) -> None:
        t = time.perf_counter()
        cat = Catalog(self.args.objects, time.time())
        cat.load(self.conninfo)
        self.out["load_s"] = round(time.perf_counter() - t, 1)
        self.out["objects"] = self.args.objects
        self.out["replicas"] = cat.replicas
        self.out["objects_by_kind"] = dict(cat.kinds)
        size = self.sql("SELECT pg_total_relation_size('objects'), pg_total_relation_size('replicas')")[0]
        self.out["catalog_mib"] = {"objects": round(size[0] / MiB), "replicas": round(size[1] / MiB)}
        self.out["load_breakdown_s"] = {k: round(v, 1) for k, v in cat.spent.items()}
        log(f"loaded {cat.n} objects and {cat.replicas} replicas with COPY in {self.out['load_s']}s "
            f"({self.out['load_breakdown_s']}; {dict(cat.kinds)}; tables {self.out['catalog_mib']} MiB)")
        self.check_selectors(cat.kinds)

    def check_selectors(self, kinds: dict[str, int]) -> None:
        """Each policy must match the objects it is meant for, as Ferry's own selector SQL
        (policies.selection.matches) evaluates it on this database."""
        from sqlalchemy import func, select

        from ferry.catalog import policies as stored
        from ferry.catalog.db import transaction
        from ferry.catalog.models import StoredObject, utcnow
        from policies.schema import Policy
        from policies.selection import matches

        logs = kinds.get("logs-hot", 0) + kinds.get("logs-cold", 0)
        expected = {"datasets-hot": kinds.get("dataset", 0), "logs-tiered": logs,
                    "scrub-everything": self.args.objects}
        matched = {}
        with transaction() as session:
            for row in stored.active(session):
                policy = Policy.from_dict(row.document)
                where = matches(policy, session.get_bind().dialect.name, utcnow())
                matched[row.name] = session.scalar(select(func.count()).select_from(StoredObject).where(where))
        self.out["policy_matched_objects"] = matched
        if matched != expected:
            raise RuntimeError(f"the policies' selectors ({self.args.selectors}) match {matched} objects, expected "
                               f"{expected}: a policy matching nothing makes the pass cheap and the figure "
                               "meaningless")

    def one_pass(self, what: str, *, env: dict[str, str] | None = None, profile: bool = False,
                 timeout: float | None = None) -> dict[str, Any] | None:
        """One pass in a child process; its result, or None if it ran over `timeout`."""
        argv = [sys.executable, str(Path(__file__).resolve()), "--child-pass"] + (["--profile"] if profile else [])
        # Named, so that a pass cut short can have its query cancelled (below).
        url = os.environ["FERRY_DATABASE_URL"] + f"?application_name={PASS_APP}"
        t = time.perf_counter()
        try:
            proc = subprocess.run(argv, env={**os.environ, "FERRY_DATABASE_URL": url, **(env or {})},
                                  capture_output=True, text=True, check=False,
                                  timeout=timeout or self.args.pass_timeout)
        except subprocess.TimeoutExpired:
            # The child is killed, but its query would run on (and keep the pass lock).
            self.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                     (PASS_APP,))
            if timeout is None:
                raise
            log(f"  {what:<28} stopped after {timeout:.0f}s")
            return None
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"the {what} pass failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["process_wall_s"] = wall
        report = result["report"]
        log(f"  {what:<28} {result['seconds']:7.2f}s  peak RSS {result['peak_rss_kib'] / 1024:6.1f} MiB "
            f"(after imports {result['baseline_rss_kib'] / 1024:.1f})  items {report.get('items')} "
            f"{report.get('work') or ''}")
        return result

    def check_converged(self, result: dict[str, Any]) -> None:
        report = result["report"]
        if (report.get("skipped") or report.get("items") or report.get("lost") or report.get("deferred_by_cap")
                or report.get("failed_policies")):
            raise RuntimeError(f"the catalog is not converged; the pass reported {report}")
        queued = self.queued()
        keys = sorted(k.decode() for k in self.redis.keys("*"))
        if keys and "broker_keys_after_converged_pass" not in self.out:
            self.out["broker_keys_after_converged_pass"] = keys
            log(f"  the broker holds {keys} (no message: {not queued})")
        if queued:
            raise RuntimeError(f"a pass over a converged catalog sent messages: {queued} in {self.redis_url}")

    def queued(self) -> dict[str, int]:
        """Messages waiting in the broker, by queue (kombu keeps a queue as a Redis list)."""
        lists = [k for k in self.redis.keys("*") if self.redis.type(k) == b"list"]
        return {k.decode(): self.redis.llen(k) for k in lists if self.redis.llen(k)}

    def reconcile(self) -> None:
        """--runs passes over the converged catalog (the first timed by query too: the
        wrappers cost microseconds a call), unless the first is over --budget-s: then that
        one is the figure. Then one pass with 250 000 objects per range."""
        runs = [self.one_pass(f"converged, run 1/{self.args.runs}", profile=True)]
        self.check_converged(runs[0])
        over = runs[0]["seconds"] > self.args.budget_s
        if over and self.args.runs > 1:
            self.out["reconcile_repeats_skipped"] = (f"run 1 took {runs[0]['seconds']:.0f}s, over --budget-s "
                                                     f"{self.args.budget_s:.0f}: one run only")
            log(f"  {self.out['reconcile_repeats_skipped']}")
        for i in range(1, 1 if over else self.args.runs):
            runs.append(self.one_pass(f"converged, run {i + 1}/{self.args.runs}"))
            self.check_converged(runs[-1])
        secs = [r["seconds"] for r in runs]
        peaks = [r["peak_rss_kib"] / 1024 for r in runs]
        self.out["reconcile_1m_s"] = round(statistics.median(secs), 2)
        self.out["reconcile_peak_rss_mib"] = round(statistics.median(peaks), 1)
        self.out["reconcile_runs_s"] = [round(s, 2) for s in secs]
        self.out["reconcile_peak_rss_runs_mib"] = [round(p, 1) for p in peaks]
        self.out["reconcile_rss_after_imports_mib"] = round(
            statistics.median(r["baseline_rss_kib"] for r in runs) / 1024, 1)
        self.out["reconcile_ru_maxrss_mib"] = round(statistics.median(r["ru_maxrss_kib"] for r in runs) / 1024, 1)
        self.out["reconcile_process_wall_s"] = round(statistics.median(r["process_wall_s"] for r in runs), 2)
        self.out["reconcile_batch_objects"] = runs[0]["batch_objects"]
        self.out["reconcile_profile_s"] = runs[0]["profile_s"]

        # Over budget, the variant is stopped once clearly slower than the default.
        limit = max(self.args.budget_s, 1.5 * statistics.median(secs)) if over else None
        alt = self.one_pass("converged, batch 250 000", env={"FERRY_RECONCILE_BATCH_OBJECTS": "250000"},
                            timeout=limit)
        if alt is None:
            self.out["reconcile_batch_250k_s"] = None
            self.out["reconcile_batch_250k_stopped_after_s"] = round(limit)
        else:
            self.check_converged(alt)
            self.out["reconcile_batch_250k_s"] = round(alt["seconds"], 2)
            self.out["reconcile_batch_250k_peak_rss_mib"] = round(alt["peak_rss_kib"] / 1024, 1)
        faster = alt is not None and alt["seconds"] < self.out["reconcile_1m_s"]
        self.out["reconcile_faster_batch_objects"] = 250_000 if faster else self.out["reconcile_batch_objects"]

    def work_pass(self) -> None:
        """Last, as it leaves work behind: 1 % of the replicas marked bad, one pass plans
        their repair (up to FERRY_MAX_IN_FLIGHT per backend) and sends it to Redis, where
        no worker takes it."""
        self.redis.flushdb()
        n = max(1, self.args.objects // 100)
        # Only replicas of objects that have another (a logs object's only replica would
        # make it lost, not repaired), spread over the id range.
        self.sql("UPDATE replicas SET state = 'bad', updated_at = now() WHERE id IN ("
                 "SELECT id FROM replicas WHERE backend = 'hot-b' AND key NOT LIKE 'logs/%%' "
                 "ORDER BY (id * 2654435761) %% 1000003 LIMIT %s)", (n,))
        # Timed by query too: the wrappers cost microseconds a call, against seconds here.
        r = self.one_pass(f"{n} bad replicas to repair", profile=True)
        report = r["report"]
        self.out["reconcile_work_profile_s"] = r["profile_s"]
        self.out["reconcile_work_pass_s"] = round(r["seconds"], 2)
        self.out["reconcile_work_peak_rss_mib"] = round(r["peak_rss_kib"] / 1024, 1)
        self.out["reconcile_work_bad_replicas"] = n
        self.out["reconcile_work_items"] = report.get("items")
        self.out["reconcile_work"] = report.get("work")
        self.out["reconcile_work_deferred_by_cap"] = report.get("deferred_by_cap")
        self.out["reconcile_work_messages"] = sum(self.queued().values())
        from ferry.settings import get_settings

        wanted = min(n, get_settings().max_in_flight)  # all of them bound for hot-b, under its cap
        if report.get("items") != wanted or report.get("lost"):
            raise RuntimeError(f"expected {wanted} repairs and nothing lost; the pass reported {report}")
        self.redis.flushdb()

    # -- scrub ----------------------------------------------------------------------

    def write_scrub_files(self) -> list[tuple[Path, str, Any]]:
        """Files under the scrub backend's root, catalogued as verified replicas there."""
        from ferry.catalog.db import transaction
        from ferry.catalog.models import ReplicaState
        from ferry.catalog.replicas import ReplicaFact, record
        from workers.cid import ContentHasher

        file_mib = min(64, self.args.scrub_mib)
        count = max(1, round(self.args.scrub_mib / file_mib))
        root = self.work / "disks" / SCRUB_BACKEND / SCRUB_PREFIX.rstrip("/")
        root.mkdir(parents=True, exist_ok=True)
        block = memoryview(os.urandom(file_mib * MiB))
        files = []
        t = time.perf_counter()
        for i in range(count):
            # One random block, a different header per file: every file its own sha256 and CID.
            header = f"ferry bench scrub file {i:05d} ".encode().ljust(64, b".")
            hasher = ContentHasher()
            path = root / f"f{i:03d}.bin"
            with open(path, "wb") as f:
                for part in (header, block[len(header):]):
                    hasher.update(part)
                    f.write(part)
            files.append((path, SCRUB_PREFIX + path.name, hasher.digest()))
        with transaction() as session:
            record(session, [ReplicaFact(SCRUB_BACKEND, key, ReplicaState.present, d.cid, d.sha256, d.size,
                                         verified=True) for _path, key, d in files])
        log(f"wrote {count} x {file_mib} MiB under {root} (sha256 and CID computed) in "
            f"{time.perf_counter() - t:.1f}s")
        return files

    def start_worker(self) -> None:
        from ferry.cli.launch import ProcessGroup, worker_command
        from tasks.app import queue_for

        self.procs = ProcessGroup(self.work / "logs", dict(os.environ))
        self.procs.start("worker", worker_command([queue_for(SCRUB_BACKEND)], 1, "scrub@%h"))
        self.procs.wait_for_log("worker", "ready.", timeout=60)

    def verify_job(self, prefix: str, expected: int) -> dict[str, Any]:
        """Submit a verify job over `prefix`; wait for its end; what it took."""
        from sqlalchemy import func, select

        from ferry.catalog.db import transaction
        from ferry.catalog.jobs import get_job
        from ferry.catalog.models import JobKind, ReplicaCheck, utcnow
        from ferry.catalog.replicas import verify_report
        from tasks.jobs import JobRequest, submit

        spec = {"source": {"backend": SCRUB_BACKEND, "prefix": prefix}, "targets": []}
        submitted = utcnow()
        t0 = time.perf_counter()
        job = submit(JobRequest(kind=JobKind.verify, source_backend=SCRUB_BACKEND, targets=[], prefix=prefix,
                                spec=spec))
        deadline = time.monotonic() + self.args.job_timeout
        while True:
            with transaction() as session:
                row = get_job(session, job.id)
                state, created, started, finished = row.state, row.created_at, row.started_at, row.finished_at
            if state.terminal:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"verify job {job.id} not finished after {self.args.job_timeout}s")
            self.procs.check_alive()
            time.sleep(0.02)
        polled = time.perf_counter() - t0
        with transaction() as session:
            report = verify_report(session, job.id)
            c = ReplicaCheck.__table__.c
            hashing_s, nbytes = session.execute(
                select(func.coalesce(func.sum(c.seconds), 0.0), func.coalesce(func.sum(c.bytes_read), 0))
                .where(c.job_id == job.id)).one()
        if state.value != "succeeded" or report["ok"] != expected or report["checked"] != expected:
            raise RuntimeError(f"verify job {job.id} ended {state.value}: {report}")
        return {"seconds": (finished - submitted).total_seconds(), "polled_s": polled,
                "listing_s": (started - created).total_seconds() if started else None,
                "bytes": int(report["bytes_read"]), "hashing_s": float(hashing_s), "hashed_bytes": int(nbytes)}

    def sha256sum(self, files: list[tuple[Path, str, Any]]) -> float:
        t = time.perf_counter()
        proc = subprocess.run(["sha256sum", *(str(p) for p, _k, _d in files)], capture_output=True, text=True,
                              check=True)
        seconds = time.perf_counter() - t
        got = dict(line.split("  ", 1)[::-1] for line in proc.stdout.splitlines())
        for path, _key, digest in files:
            if got.get(str(path)) != digest.sha256:
                raise RuntimeError(f"sha256sum says {got.get(str(path))} for {path}, Ferry {digest.sha256}")
        return seconds

    def openssl(self, files: list[tuple[Path, str, Any]]) -> float | None:
        """`openssl dgst -sha256` over the same files: for information, a peer that uses the
        CPU's SHA instructions as Python's hashlib does (coreutils' sha256sum may not)."""
        if shutil.which("openssl") is None:
            return None
        t = time.perf_counter()
        proc = subprocess.run(["openssl", "dgst", "-sha256", *(str(p) for p, _k, _d in files)],
                              capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - t
        digests = {line.rsplit("= ", 1)[-1] for line in proc.stdout.splitlines()}
        if digests != {d.sha256 for _p, _k, d in files}:
            raise RuntimeError(f"openssl dgst disagrees with Ferry on the files' sha256:\n{proc.stdout[:2000]}")
        return seconds

    def scrub(self) -> None:
        files = self.write_scrub_files()
        total = sum(d.size for _p, _k, d in files)
        for path, _key, _digest in files:  # warm the page cache for both tools alike
            with open(path, "rb", buffering=0) as f:
                while f.read(8 * MiB):
                    pass
        self.start_worker()
        self.verify_job(SCRUB_PREFIX + files[0][0].name, 1)  # warm-up: a worker is long-lived
        sums, ossl, scrubs = [], [], []
        for i in range(self.args.runs):
            s = self.sha256sum(files)
            sums.append(total / s / MB)
            log(f"  sha256sum run {i + 1}/{self.args.runs}   {s:7.2f}s  {sums[-1]:8.1f} MB/s")
            o = self.openssl(files)
            if o is not None:
                ossl.append(total / o / MB)
                log(f"  openssl run {i + 1}/{self.args.runs}     {o:7.2f}s  {ossl[-1]:8.1f} MB/s")
            r = self.verify_job(SCRUB_PREFIX, len(files))
            if r["bytes"] != total:
                raise RuntimeError(f"the verify job read {r['bytes']} bytes, expected {total}")
            r["mb_per_s"] = total / r["seconds"] / MB
            r["hashing_mb_per_s"] = r["hashed_bytes"] / r["hashing_s"] / MB
            scrubs.append(r)
            log(f"  scrub run {i + 1}/{self.args.runs}       {r['seconds']:7.2f}s  {r['mb_per_s']:8.1f} MB/s "
                f"(listing {r['listing_s']:.2f}s; in-worker hashing {r['hashing_mb_per_s']:.1f} MB/s)")
        med_scrub = statistics.median(r["mb_per_s"] for r in scrubs)
        med_sum = statistics.median(sums)
        self.out.update({
            "scrub_mb_per_s": round(med_scrub, 1),
            "sha256sum_mb_per_s": round(med_sum, 1),
            "ratio_scrub": round(med_scrub / med_sum, 3),
            "scrub_hashing_mb_per_s": round(statistics.median(r["hashing_mb_per_s"] for r in scrubs), 1),
            "ratio_scrub_hashing": round(statistics.median(r["hashing_mb_per_s"] for r in scrubs) / med_sum, 3),
            "scrub_listing_s": round(statistics.median(r["listing_s"] for r in scrubs), 3),
            "openssl_sha256_mb_per_s": round(statistics.median(ossl), 1) if ossl else None,
            "ratio_scrub_openssl": round(med_scrub / statistics.median(ossl), 3) if ossl else None,
            "scrub_files": len(files),
            "scrub_mib": round(total / MiB),
        })
        self.raw["scrub_mb_per_s"] = [round(r["mb_per_s"], 1) for r in scrubs]
        self.raw["scrub_s"] = [round(r["seconds"], 3) for r in scrubs]
        self.raw["scrub_polled_s"] = [round(r["polled_s"], 3) for r in scrubs]
        self.raw["scrub_hashing_mb_per_s"] = [round(r["hashing_mb_per_s"], 1) for r in scrubs]
        self.raw["sha256sum_mb_per_s"] = [round(x, 1) for x in sums]
        self.raw["openssl_sha256_mb_per_s"] = [round(x, 1) for x in ossl]
        self.procs.stop()

    # -- run and tear-down ----------------------------------------------------------

    def status_and_plan(self) -> None:
        """What `ferry policy status` and `ferry policy plan` cost on this catalog, per
        policy: status is one aggregate query over every matched object, plan runs the
        pass's queries over every range without enqueueing."""
        from ferry.catalog import policies as stored
        from ferry.catalog.db import transaction
        from ferry.catalog.models import utcnow
        from ferry.settings import get_settings
        from policies import planner
        from policies.schema import Policy

        labels = {n: dict(spec.labels) for n, spec in get_settings().backends().items()}
        status_s, plan_s = {}, {}
        with transaction() as session:
            rows = stored.active(session)
            queries = {r.name: planner.PolicyQueries(Policy.from_dict(r.document), labels, "postgresql", utcnow())
                       for r in rows}
            for name, q in queries.items():
                t = time.perf_counter()
                counts = planner.status(session, q)
                status_s[name] = round(time.perf_counter() - t, 2)
                if counts["converged"] != counts["matched"] and q.stages is not None:
                    raise RuntimeError(f"policy {name} is not converged by its status: {counts}")
                t = time.perf_counter()
                planner.plan(session, q, [o for o in queries.values() if o is not q],
                             get_settings().reconcile_batch_objects)
                plan_s[name] = round(time.perf_counter() - t, 2)
        self.out["policy_status_s"] = status_s
        self.out["policy_plan_s"] = plan_s
        log(f"  policy status {status_s}  plan {plan_s}")

    def run(self) -> dict[str, Any]:
        from migrate import git_commit

        t0 = time.monotonic()
        load_start = os.getloadavg()
        digest_start, commit_start = source_digest(), git_commit()
        self.setup()
        self.load()
        self.reconcile()
        self.status_and_plan()
        if self.args.scrub_mib > 0:
            self.scrub()
        self.work_pass()
        out = {k: self.out.get(k) for k in ("reconcile_1m_s", "reconcile_peak_rss_mib", "scrub_mb_per_s",
                                             "sha256sum_mb_per_s", "ratio_scrub")}
        out.update({k: v for k, v in self.out.items() if k not in out})
        out.update({
            "raw": self.raw,
            "mb_unit": "MB (10**6 bytes); *_mib: 2**20 bytes",
            "runs": self.args.runs,
            "selectors": self.args.selectors,
            "cores": os.cpu_count(),
            "postgres": self.sql("SHOW server_version")[0][0],
            "python": platform.python_version(),
            "git_commit": commit_start,
            "git_modified": modified_files(),
            "source_digest": digest_start,
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "bench_wall_s": round(time.monotonic() - t0, 1),
        })
        if source_digest() != digest_start:
            out["source_changed_during_run"] = True
            log(f"WARNING: Ferry's sources changed during the run (commit {commit_start} -> {git_commit()}): "
                "passes started before and after measured different code")
        return out

    def cleanup(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if self.procs is not None:
            self.procs.stop()
        try:
            self.pg.drop()  # WITH (FORCE): connections still open (ours included) are closed
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
            log(f"could not drop database {DBNAME}: {exc}")
        if self.redis is not None:
            try:
                self.redis.flushdb()
            except Exception as exc:  # noqa: BLE001
                log(f"could not flush {self.redis_url}: {exc}")
        if self.args.keep:
            log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def source_digest() -> str:
    """A digest of Ferry's Python sources: the tree is shared with people working on it,
    and a pass imports the code as it is when the pass starts."""
    h = hashlib.sha256()
    for package in ("ferry", "policies", "tasks", "workers"):
        for path in sorted((REPO / package).rglob("*.py")):
            h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def modified_files() -> list[str] | None:
    """Tracked files changed since the commit (read-only `git status`): what was measured
    is the working tree, which may be ahead of git_commit."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    return sorted(line[3:] for line in out.splitlines() if line.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=1_000_000, help="catalogued objects (default 1 000 000)")
    p.add_argument("--scrub-mib", type=int, default=2048, help="MiB of files to scrub, in files of 64 MiB "
                   "(0: no scrub measurement)")
    p.add_argument("--runs", type=int, default=3, help="repetitions of each measurement (medians reported)")
    p.add_argument("--selectors", choices=sorted(SELECTORS), default="tags",
                   help="how the dataset and logs policies select their objects (default: tags)")
    p.add_argument("--postgres", default=os.environ.get("FERRY_BENCH_POSTGRES",
                                                        "postgresql://postgres@127.0.0.1:5432/postgres"),
                   help=f"admin URL; database {DBNAME} is (re)created next to it and dropped at the end")
    p.add_argument("--redis", default=os.environ.get("FERRY_BENCH_REDIS", "redis://127.0.0.1:6379"))
    p.add_argument("--redis-db", type=int, default=14, help="Redis db used as the broker (flushed)")
    p.add_argument("--workdir", default=None, help="where to create the temp dir (default: the system tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, files) at the end")
    p.add_argument("--budget-s", type=float, default=120,
                   help="a converged pass slower than this is not repeated (default 120: 4x the target)")
    p.add_argument("--pass-timeout", type=float, default=3600, help="seconds before a pass counts as hung")
    p.add_argument("--job-timeout", type=float, default=600, help="seconds before a verify job counts as hung")
    p.add_argument("--child-pass", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.objects < 100 or args.runs < 1 or args.scrub_mib < 0:
        p.error("--objects must be at least 100, --runs at least 1, --scrub-mib at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_pass:
        return child_pass(args.profile)
    if shutil.which("sha256sum") is None and args.scrub_mib:
        print("bench: sha256sum not found on PATH", file=sys.stderr)
        return 2

    bench = Bench(args)
    return common.run(bench, lambda: (bench.procs,), log)


if __name__ == "__main__":
    sys.exit(main())
