"""Search end to end: real API processes, a real worker on the `index` queue with the
bundled all-MiniLM-L6-v2, Postgres full-text search and FAISS snapshots.

The corpus (tests/fixtures/corpus.py) has queries with known answers: lexical ones (rare
terms: full-text's strength), semantic ones (paraphrases sharing no word with their
answers: vectors' strength) and mixed ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from ferry.catalog.db import transaction
from ferry.catalog.models import Replica, SearchChunk, SearchDocument, SearchIndexState, StoredObject
from tests.fixtures import corpus
from tests.fixtures.cluster import Cluster, auth, running_cluster, wait_job

pytestmark = pytest.mark.e2e
PREFIX = "search/"


@pytest.fixture(scope="module")
def search_cluster(test_env) -> Iterator[tuple[Cluster, list[str]]]:
    """One worker on every queue (the index queue too), beat, and two API servers of one
    process each, so each query below can be asked of both."""
    env = {"FERRY_SEARCH_RELOAD_SECONDS": "0", "FERRY_SEARCH_PUBLISH_SECONDS": "1",
           "FERRY_RECONCILE_INTERVAL_SECONDS": "1", "FERRY_SEARCH_DIR": str(test_env["tmp"] / "search-snapshots")}
    with running_cluster(test_env, "search", env, beat=True, apis=2, api_workers=1, concurrency=1) as c:
        yield c, c.api_urls


@pytest.fixture(scope="module")
def apis(search_cluster) -> Iterator[list[httpx.Client]]:
    _, urls = search_cluster
    clients = [httpx.Client(base_url=u, timeout=120, headers=auth()) for u in urls]
    yield clients
    for client in clients:
        client.close()


@pytest.fixture(scope="module")
def indexed(apis, disks) -> dict[str, str]:
    """The corpus written to the `local` disk, catalogued (replicated to `mirror`, tagged),
    then indexed by one index job; returns key -> CID."""
    api = apis[0]
    docs = corpus.documents()
    by_tags: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for d in docs:
        path = disks / "local" / PREFIX / d.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(d.body)
        by_tags[d.tags].append(PREFIX + d.key)
    for tags, keys in by_tags.items():
        r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "local", "keys": keys},
                                        "targets": [{"backend": "mirror", "prefix": ""}], "tags": list(tags)})
        assert r.status_code == 202, r.text
        assert wait_job(api, r.json()["id"])["state"] == "succeeded"
    r = api.post("/v1/jobs", json={"kind": "index", "source": {"backend": "local", "prefix": PREFIX}})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"], timeout=600)
    assert job["state"] == "succeeded", job
    assert job["items"]["done"] == len(docs)
    with transaction() as s:
        cids = dict(s.execute(select(SearchDocument.name, StoredObject.cid)
                              .join(StoredObject, StoredObject.id == SearchDocument.object_id)).all())
    return {k[len(PREFIX):]: v for k, v in cids.items() if k.startswith(PREFIX)}


def search(api: httpx.Client, query: str, mode: str, **kw) -> dict:
    r = api.post("/v1/search", json={"query": query, "mode": mode, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def top_keys(api: httpx.Client, query: str, mode: str, k: int = 10, **kw) -> list[str]:
    return [h["name"][len(PREFIX):] for h in search(api, query, mode, limit=k, **kw)["hits"]]


def test_each_mode_finds_the_answers_and_hybrid_is_at_least_the_better(apis, indexed):
    api = apis[0]
    recall: dict[tuple[str, str], list[float]] = defaultdict(list)
    for q in corpus.queries():
        for mode in ("text", "vector", "hybrid"):
            got = set(top_keys(api, q.text, mode))
            r = len(got & q.relevant) / len(q.relevant)
            if r < 1 and (mode, q.kind) in (("text", "lexical"), ("vector", "semantic")):
                print(f"{mode} missed {sorted(q.relevant - got)} for {q.text!r}")
            recall[(mode, q.kind)].append(r)
            recall[(mode, "all")].append(r)
    mean = {key: sum(v) / len(v) for key, v in recall.items()}
    print({f"{m}/{k}": round(v, 3) for (m, k), v in sorted(mean.items())})
    assert mean[("text", "lexical")] >= 0.9, mean
    assert mean[("vector", "semantic")] >= 0.8, mean
    assert mean[("hybrid", "all")] >= max(mean[("text", "all")], mean[("vector", "all")]), mean


def test_filters_pages_and_snippets(apis, indexed):
    api = apis[0]
    docs = corpus.documents()
    md = search(api, "stars telescope", "hybrid", limit=20, filters={"media_type": ["text/markdown"]})["hits"]
    assert md and all(h["media_type"] == "text/markdown" for h in md)
    tag = next(t for d in docs for t in d.tags if t != d.topic)
    tagged = {PREFIX + d.key for d in docs if tag in d.tags}
    hits = search(api, "the", "vector", limit=50, filters={"tags": [tag]})["hits"]
    assert hits and {h["name"] for h in hits} <= tagged
    # None of the corpus is stored there (other modules' objects may be: the catalog is shared).
    on_archive = search(api, "stars", "hybrid", filters={"backend": ["archive"]}, limit=100)["hits"]
    assert not [h for h in on_archive if (h["name"] or "").startswith(PREFIX)]
    first = search(api, "stars telescope", "hybrid", limit=5)
    second = search(api, "stars telescope", "hybrid", limit=5, offset=5)
    assert first["next_offset"] == 5
    assert not {h["cid"] for h in first["hits"]} & {h["cid"] for h in second["hits"]}
    lexical = next(q for q in corpus.queries() if q.kind == "lexical" and " " not in q.text)
    hit = search(api, lexical.text, "text")["hits"][0]
    assert "<mark>" in hit["snippet"] and lexical.text.lower() in hit["snippet"].lower()
    text = api.get(f"/v1/objects/{hit['cid']}/text").json()
    assert lexical.text in text["text"] and text["chunks"] >= 1 and text["model"] == "all-MiniLM-L6-v2"


def test_reindexing_unchanged_objects_does_nothing(apis, indexed):
    api = apis[0]
    with transaction() as s:
        before = s.scalar(select(func.max(SearchChunk.id))), s.scalar(select(func.count()).select_from(SearchChunk))
    r = api.post("/v1/jobs", json={"kind": "index", "source": {"backend": "local", "prefix": PREFIX}})
    job = wait_job(api, r.json()["id"])
    assert job["state"] == "succeeded" and job["items"]["skipped"] == len(indexed) and job["items"]["done"] == 0
    with transaction() as s:
        after = s.scalar(select(func.max(SearchChunk.id))), s.scalar(select(func.count()).select_from(SearchChunk))
    assert after == before


def test_a_caller_sees_only_objects_it_may_read(apis, indexed, search_cluster):
    from ferry.catalog.models import Role
    from ferry.security import create_key

    with transaction() as s:
        _, key = create_key(s, name="archive reader", role=Role.viewer,
                            grants=[{"backends": "archive", "access": "read"}])
    with httpx.Client(base_url=search_cluster[1][0], timeout=60, headers=auth(key)) as viewer:
        r = viewer.post("/v1/search", json={"query": "stars", "mode": "hybrid", "limit": 100})
        assert r.status_code == 200
        assert not [h for h in r.json()["hits"] if (h["name"] or "").startswith(PREFIX)]  # all on local, mirror
        assert [h for h in search(apis[0], "stars", "hybrid", limit=100)["hits"] if h["name"].startswith(PREFIX)]
        cid = next(iter(indexed.values()))
        assert viewer.get(f"/v1/objects/{cid}/text").status_code == 403


def _add_docs(api: httpx.Client, disks, docs: dict[str, bytes], tags: list[str]) -> dict[str, str]:
    keys = []
    for key, body in docs.items():
        (disks / "local" / key).parent.mkdir(parents=True, exist_ok=True)
        (disks / "local" / key).write_bytes(body)
        keys.append(key)
    r = api.post("/v1/jobs", json={"kind": "replicate", "source": {"backend": "local", "keys": keys},
                                    "targets": [{"backend": "mirror", "prefix": ""}], "tags": tags})
    assert wait_job(api, r.json()["id"])["state"] == "succeeded"
    with transaction() as s:
        return dict(s.execute(select(Replica.key, StoredObject.cid)
                              .join(StoredObject, StoredObject.id == Replica.object_id)
                              .where(Replica.backend == "local", Replica.key.in_(keys))).all())


def _wait(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_policy_indexes_new_objects_every_api_process_sees_them_and_deletes_leave_no_hits(apis, indexed, disks,
                                                                                         test_env):
    api = apis[0]
    # A policy keeps objects tagged `auto` indexed: no index job needed.
    policy = {"name": "auto-index", "selector": {"tags": ["auto"], "index": True}}
    r = api.post("/v1/policies", json={"document": policy})
    assert r.status_code == 201, r.text
    fresh = {f"{PREFIX}new/zephyrine-{i}.md": (f"# Zephyrine report {i}\n\nThe zephyrine lattice forms when cobalt "
                                                f"glass cools slowly; sample {i} shows it plainly.\n").encode()
             for i in range(3)}
    # A binary object is found by its name, tags and metadata (a metadata-only entry).
    fresh[f"{PREFIX}new/zephyrine-lattice-micrograph.png"] = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    cids = _add_docs(api, disks, fresh, ["auto"])
    png = cids[f"{PREFIX}new/zephyrine-lattice-micrograph.png"]

    def everywhere(mode: str, n: int) -> bool:
        return all(len([h for h in search(c, "zephyrine lattice", mode, limit=10)["hits"]
                        if h["cid"] in cids.values()]) == n for c in apis)

    _wait(lambda: everywhere("text", 4), what="the policy's index work, seen by full-text on both APIs")
    entry = api.get(f"/v1/objects/{png}/text").json()
    assert entry["metadata_only"] and entry["media_type"] == "image/png" and "binary" in entry["reason"]
    assert entry["text"] == ""
    # Vectors: both processes reload the snapshot the index worker published.
    _wait(lambda: everywhere("vector", 4), what="both API processes to load the new vector snapshot")
    gens = {search(c, "zephyrine lattice", "vector")["vector_generation"] for c in apis}
    assert len(gens) == 1, gens
    # Retention deletes every replica of an object tagged `doomed`: its entries go from both indexes.
    doomed_key = f"{PREFIX}new/zephyrine-0.md"
    with transaction() as s:
        doomed_chunks = set(s.scalars(select(SearchChunk.id)
                                      .join(StoredObject, StoredObject.id == SearchChunk.object_id)
                                      .where(StoredObject.cid == cids[doomed_key])))
    assert doomed_chunks
    r = api.patch(f"/v1/objects/{cids[doomed_key]}", json={"add_tags": ["doomed"]})
    assert r.status_code == 200, r.text
    r = api.post("/v1/policies", json={"document": {"name": "doom", "selector": {"tags": ["doomed"]},
                                                    "retention": {"delete_after": "1s"}}})
    assert r.status_code == 201, r.text

    def chunks_left() -> int:
        with transaction() as s:
            return s.scalar(select(func.count()).select_from(SearchChunk).join(
                StoredObject, StoredObject.id == SearchChunk.object_id).where(StoredObject.cid == cids[doomed_key]))

    _wait(lambda: chunks_left() == 0, what="retention to delete the object and its search entries")
    for c in apis:
        for mode in ("text", "vector", "hybrid"):
            assert cids[doomed_key] not in {h["cid"] for h in search(c, "zephyrine lattice", mode)["hits"]}, mode
    # ... and the published vector index drops their ids too.
    def snapshot_ids() -> set[int]:
        import faiss

        with transaction() as s:
            name = s.get(SearchIndexState, 1).snapshot
        index = faiss.read_index(str(test_env["tmp"] / "search-snapshots" / name))
        return set(faiss.vector_to_array(index.id_map).tolist())

    _wait(lambda: not snapshot_ids() & doomed_chunks, what="a snapshot without the deleted chunks")
    for name in ("doom", "auto-index"):
        assert api.delete(f"/v1/policies/{name}").status_code == 200


def test_deleting_an_object_takes_it_off_every_backend_and_out_of_search_at_once(apis, indexed, disks):
    api = apis[0]
    q = next(q for q in corpus.queries() if q.kind == "semantic")
    victim, kept = sorted(q.relevant)[:2]
    assert victim in top_keys(api, q.text, "vector") and victim in top_keys(api, q.text, "hybrid")
    # Under legal hold: refused, nothing changes.
    assert api.put(f"/v1/objects/{indexed[kept]}/hold", json={"hold": True}).status_code == 200
    r = api.delete(f"/v1/objects/{indexed[kept]}")
    assert r.status_code == 409 and "legal hold" in r.json()["error"]["message"]
    assert kept in top_keys(api, q.text, "vector")
    api.put(f"/v1/objects/{indexed[kept]}/hold", json={"hold": False})
    r = api.delete(f"/v1/objects/{indexed[victim]}")
    assert r.status_code == 202, r.text
    # Out of both indexes as soon as the request is answered, on every API process.
    for c in apis:
        for mode in ("text", "vector", "hybrid"):
            assert victim not in top_keys(c, q.text, mode, k=50), mode
    job = wait_job(api, r.json()["id"])
    assert job["kind"] == "delete" and job["state"] == "succeeded" and job["items"]["done"] == 2, job
    assert not (disks / "local" / PREFIX / victim).exists() and not (disks / "mirror" / PREFIX / victim).exists()
    replicas = api.get(f"/v1/objects/{indexed[victim]}").json()["replicas"]
    assert {r["state"] for r in replicas} == {"gone"}
    assert api.get(f"/v1/objects/{indexed[victim]}/text").status_code == 404


def test_the_cli_indexes_searches_and_shows_text(search_cluster, indexed, disks):
    _, urls = search_cluster
    ferry = str(Path(sys.executable).parent / "ferry")
    env = {**os.environ, "FERRY_API_URL": urls[1], "COLUMNS": "200"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([ferry, *args], capture_output=True, text=True, env=env, timeout=300)

    q = next(q for q in corpus.queries() if q.kind == "lexical" and " " not in q.text)
    r = run("search", q.text, "--mode", "text")
    assert r.returncode == 0, r.stderr
    assert q.text in r.stdout and "text, " in r.stdout  # the table's title names the mode
    assert all(PREFIX + key in r.stdout for key in q.relevant), r.stdout
    data = json.loads(run("search", q.text, "--json", "--limit", "3").stdout)
    assert data["mode"] == "hybrid" and len(data["hits"]) <= 3
    r = run("text", data["hits"][0]["cid"])
    assert r.returncode == 0 and q.text in r.stdout
    r = run("search", "anything", "--meta", "no-equals-sign")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr
    for verb in ("text", "delete"):
        r = run(verb, "bafkqnotanobject")
        assert r.returncode == 2 and "no object" in r.stderr, (verb, r.stderr)
    # An index job from the CLI, followed to its end: unchanged objects are skipped.
    r = run("index", f"local:{PREFIX}corpus/chess/")
    assert r.returncode == 0, r.stderr
    assert "index job" in r.stdout and "succeeded" in r.stdout
