"""The same planner on the embedded catalog (SQLite): selectors on tags and metadata
(json_each / json_extract instead of JSONB), transitions, retention, status and plan."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import yaml
from sqlalchemy import select, update

from ferry.catalog import policies as stored
from ferry.catalog.db import transaction
from ferry.catalog.models import JobItem, StoredObject, utcnow
from ferry.catalog.replicas import ReplicaFact, label_objects, record
from ferry.settings import get_settings
from policies import planner
from policies.schema import Policy
from tasks.reconcile import run_pass


@pytest.fixture
def sqlite_catalog(tmp_path, monkeypatch) -> Iterator[None]:
    from ferry.catalog.migrate import upgrade

    monkeypatch.setenv("FERRY_DATABASE_URL", f"sqlite:///{tmp_path / 'catalog.db'}")
    get_settings.cache_clear()
    try:
        upgrade()
        from ferry.catalog.replicas import sync_backends

        with transaction() as s:
            sync_backends(s, get_settings().backends())
        yield
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def apply(doc: dict) -> Policy:
    p = Policy.from_yaml(yaml.safe_dump(doc))
    with transaction() as s:
        stored.apply(s, p.name, p.to_document(), next_run_at=p.schedule.next_run_after(utcnow()))
    return p


def test_selectors_transitions_and_retention_on_sqlite(sqlite_catalog):
    facts = [ReplicaFact("local", f"sq/f{i}", "present", f"cid-sq{i}", f"{i:064d}", 1000 * (i + 1), verified=True)
             for i in range(6)]
    with transaction() as s:
        ids = record(s, facts)
        by_key = {f"sq/f{i}": ids[f"cid-sq{i}"] for i in range(6)}
        label_objects(s, [by_key["sq/f0"], by_key["sq/f1"], by_key["sq/f2"]], tags=["ds"],
                      metadata={"team": "a", "n": 1, "hot": True})
        label_objects(s, [by_key["sq/f3"]], tags=["ds", "x"], metadata={"team": "b"}, media_type="text/csv")
        # f2 is old: past the transition; f4 is older: past retention.
        s.execute(update(StoredObject).where(StoredObject.id == by_key["sq/f2"])
                  .values(created_at=utcnow() - timedelta(days=40)))
        s.execute(update(StoredObject).where(StoredObject.id == by_key["sq/f4"])
                  .values(created_at=utcnow() - timedelta(days=400)))
    apply({"name": "sq-team-a", "selector": {"tags": ["ds"], "metadata": {"team": "a", "hot": True, "n": 1}},
           "placement": {"backends": "tier=hot", "replicas": 2, "spread": "zone"},
           "transitions": [{"after": "30d", "since": "creation", "to": "tier=cold & !region"}]})
    apply({"name": "sq-csv", "selector": {"media_type": "text/*", "size": {"min": "3KB"}, "prefix": "sq/"},
           "placement": {"backends": "tier=cold & !region"}})
    apply({"name": "sq-expire", "selector": {"prefix": "sq/", "age": {"min": "300d"}},
           "retention": {"delete_after": "365d"}})
    report = run_pass()
    assert not report["failed_policies"], report
    with transaction() as s:
        work = sorted((oid, a.value, b) for oid, a, b in s.execute(
            select(JobItem.object_id, JobItem.action, JobItem.dest_backend)))
    assert work == sorted([
        (by_key["sq/f0"], "copy", "mirror"), (by_key["sq/f1"], "copy", "mirror"),  # team a: 2 hot
        (by_key["sq/f2"], "copy", "archive"),                                       # team a, 40 days: cold
        (by_key["sq/f3"], "copy", "archive"),                                       # csv >= 3 KB
        (by_key["sq/f4"], "delete", "local"),                                       # 400 days: retention
    ])
    with transaction() as s:
        labels = {n: dict(spec.labels) for n, spec in get_settings().backends().items()}
        q = planner.PolicyQueries(Policy.from_dict(stored.get(s, "sq-team-a").document), labels, "sqlite", utcnow())
        assert planner.status(s, q) == {"matched": 3, "converged": 0, "replicating": 3, "stuck": 0, "bad": 0,
                                        "lost": 0}
        assert planner.plan(s, q, [], 1000)["copy"]["objects"] == 0  # all in flight already


KEYS = ["Ph/a", "ph/a", "ph/", "ph", "ph_/x", "ph%/x", "ph/\u00e9t\u00e9", "phx/a", "ph0"]


@pytest.mark.parametrize("prefix,expected", [
    ("ph/", {"ph/a", "ph/", "ph/\u00e9t\u00e9"}),          # case-sensitive, no neighbours
    ("ph_", {"ph_/x"}), ("ph%", {"ph%/x"}),                 # LIKE's wildcards are plain characters
    ("ph/\u00e9", {"ph/\u00e9t\u00e9"}),
])
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_key_prefix_is_exact_on_both_databases(tmp_path, monkeypatch, database, prefix, expected):
    from ferry.catalog.migrate import upgrade
    from ferry.catalog.models import Replica
    from ferry.catalog.replicas import sync_backends, under_prefix

    if database == "sqlite":
        monkeypatch.setenv("FERRY_DATABASE_URL", f"sqlite:///{tmp_path / 'keys.db'}")
        get_settings.cache_clear()
        upgrade()
    try:
        with transaction() as s:
            sync_backends(s, get_settings().backends())
            record(s, [ReplicaFact("archive", f"kp-{database}/{k}", "present", f"cid-kp-{database}-{k}", "0" * 64, 1)
                       for k in KEYS])
            found = {k.removeprefix(f"kp-{database}/") for k in s.scalars(
                select(Replica.key).where(Replica.backend == "archive",
                                          under_prefix(Replica.key, f"kp-{database}/{prefix}")))}
        assert found == expected
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_the_reconcile_task_counts_its_passes_and_stamps_the_last_one(sqlite_catalog, tmp_path, monkeypatch):
    import time

    from prometheus_client import REGISTRY
    from sqlalchemy.exc import OperationalError

    from tasks import reconcile as task

    def count(outcome: str) -> float:
        return REGISTRY.get_sample_value("ferry_reconcile_passes_total", {"outcome": outcome}) or 0.0

    before = {o: count(o) for o in ("done", "failed")}
    started = time.time()
    task.reconcile()  # the task's body, here, on the embedded catalog
    assert count("done") == before["done"] + 1
    assert started <= REGISTRY.get_sample_value("ferry_reconcile_last_pass_timestamp_seconds") <= time.time()

    # A pass that raises: a catalog whose tables were never made.
    monkeypatch.setenv("FERRY_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    get_settings.cache_clear()
    stamped = REGISTRY.get_sample_value("ferry_reconcile_last_pass_timestamp_seconds")
    with pytest.raises(OperationalError, match="no such table"):
        task.reconcile()
    assert count("failed") == before["failed"] + 1 and count("done") == before["done"] + 1
    assert REGISTRY.get_sample_value("ferry_reconcile_last_pass_timestamp_seconds") == stamped
