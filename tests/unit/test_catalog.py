"""Catalog queries against the session's Postgres: claims, leases, sweeps, job endings."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from ferry.catalog import jobs as catalog
from ferry.catalog.db import after_commit, transaction
from ferry.catalog.models import (
    ItemState,
    Job,
    JobItem,
    JobKind,
    JobState,
    ReplicaState,
    utcnow,
)
from ferry.catalog.replicas import ReplicaFact, record, replicas_at


def new_job(n: int, *, backend: str = "archive") -> uuid.UUID:
    with transaction() as s:
        job = catalog.create_job(s, kind=JobKind.replicate, source_backend="local",
                                 spec={"source": {"backend": "local"}, "targets": []}, expand=False)
        items = [catalog.NewItem(f"k{i}", backend, f"k{i}", size=10) for i in range(n)]
        catalog.add_items(s, job.id, 0, items, batch_items=100, batch_bytes=2**30)
        catalog.mark_expanded(s, job, n)
        return job.id


def test_plan_batches_cuts_by_count_bytes_and_destination():
    jid = uuid.uuid4()
    items = [catalog.NewItem(f"k{i}", "a" if i < 5 else "b", f"k{i}", size=100) for i in range(9)]
    batches = catalog.plan_batches(jid, 10, items, batch_items=3, batch_bytes=250)
    assert [(b.backend, b.spans) for b in batches] == [
        ("a", [(10, 12)]), ("a", [(12, 14)]), ("a", [(14, 15)]),
        ("b", [(15, 17)]), ("b", [(17, 19)])]
    sizes_unknown = [catalog.NewItem(f"k{i}", "a", f"k{i}") for i in range(7)]
    assert [b.spans for b in catalog.plan_batches(jid, 0, sizes_unknown, batch_items=3, batch_bytes=2**30)] == [
        [(0, 3)], [(3, 6)], [(6, 7)]]
    # An unknown size counts as catalog.UNKNOWN_SIZE: two of them fill a 2 MiB batch.
    assert [b.spans for b in catalog.plan_batches(jid, 0, sizes_unknown, batch_items=100,
                                                  batch_bytes=2 * catalog.UNKNOWN_SIZE)] == [
        [(0, 2)], [(2, 4)], [(4, 6)], [(6, 7)]]
    # An object larger than a batch still travels, alone.
    big = [catalog.NewItem("s", "a", "s", size=1), catalog.NewItem("b", "a", "b", size=10**12),
           catalog.NewItem("t", "a", "t", size=1)]
    assert [b.spans for b in catalog.plan_batches(jid, 0, big, batch_items=100, batch_bytes=100)] == [
        [(0, 1)], [(1, 2)], [(2, 3)]]


def test_spans_of():
    assert catalog.spans_of([]) == []
    assert catalog.spans_of([1, 2, 3, 7, 9, 10]) == [(1, 4), (7, 8), (9, 11)]


def test_a_batch_delivered_twice_is_claimed_once():
    jid = new_job(5)
    with transaction() as s:
        first = catalog.claim_items(s, jid, [(0, 5)], lease=timedelta(minutes=5))
    with transaction() as s:
        second = catalog.claim_items(s, jid, [(0, 5)], lease=timedelta(minutes=5))
    assert [i.seq for i in first] == [0, 1, 2, 3, 4]
    assert second == []


def test_expired_lease_is_claimable_and_swept():
    jid = new_job(3)
    with transaction() as s:
        catalog.claim_items(s, jid, [(0, 3)], lease=timedelta(seconds=-1))  # already expired
    with transaction() as s:
        stalled = [r for r in catalog.requeue_stalled(s, now=utcnow(), requeue_after=timedelta(hours=1))
                   if r[0] == jid]
    assert stalled == [(jid, 0, "archive"), (jid, 1, "archive"), (jid, 2, "archive")]
    with transaction() as s:
        states = s.scalars(select(JobItem.state).where(JobItem.job_id == jid)).all()
        assert set(states) == {ItemState.queued}
        again = catalog.claim_items(s, jid, [(0, 3)], lease=timedelta(minutes=5))
        assert [i.attempts for i in again] == [2, 2, 2]


def test_live_lease_is_not_swept_or_stolen():
    jid = new_job(2)
    with transaction() as s:
        catalog.claim_items(s, jid, [(0, 2)], lease=timedelta(minutes=5))
    with transaction() as s:
        assert not [r for r in catalog.requeue_stalled(s, now=utcnow(), requeue_after=timedelta(hours=1))
                    if r[0] == jid]
        assert catalog.claim_items(s, jid, [(0, 2)], lease=timedelta(minutes=5)) == []


def test_queued_too_long_is_sent_again():
    jid = new_job(2)
    later = utcnow() + timedelta(hours=2)
    with transaction() as s:
        stalled = [r for r in catalog.requeue_stalled(s, now=later, requeue_after=timedelta(hours=1))
                   if r[0] == jid]
    assert [seq for _, seq, _ in stalled] == [0, 1]


@pytest.mark.parametrize("outcomes,expected", [
    ([ItemState.done, ItemState.skipped], JobState.succeeded),
    ([ItemState.done, ItemState.failed], JobState.partially_failed),
    ([ItemState.failed, ItemState.failed], JobState.failed),
])
def test_job_ends_by_its_items(outcomes, expected):
    jid = new_job(len(outcomes))
    with transaction() as s:
        catalog.claim_items(s, jid, [(0, len(outcomes))], lease=timedelta(minutes=5))
        catalog.finish_items(s, jid, [{"seq": 0, "state": outcomes[0]}])
        assert catalog.finish_if_complete(s, jid) is None  # one item still open
        catalog.finish_items(s, jid, [{"seq": i, "state": st} for i, st in enumerate(outcomes)][1:])
        assert catalog.finish_if_complete(s, jid) == expected
        assert catalog.finish_if_complete(s, jid) is None  # ends once


def test_finishing_an_item_twice_changes_nothing():
    jid = new_job(1)
    with transaction() as s:
        catalog.claim_items(s, jid, [(0, 1)], lease=timedelta(minutes=5))
        catalog.finish_items(s, jid, [{"seq": 0, "state": ItemState.done, "size": 5}])
        catalog.finish_items(s, jid, [{"seq": 0, "state": ItemState.failed, "error": "late duplicate"}])
        item = s.get(JobItem, (jid, 0))
        assert (item.state, item.error) == (ItemState.done, None)


def test_cancel_drops_queued_items_and_refuses_twice():
    from ferry.errors import Conflict

    jid = new_job(3)
    with transaction() as s:
        catalog.claim_items(s, jid, [(0, 1)], lease=timedelta(minutes=5))
        catalog.cancel_job(s, jid)
    with transaction() as s:
        c = catalog.counts(s, jid)["items"]
        assert (c["cancelled"], c["running"]) == (2, 1)
        assert s.get(Job, jid).state == JobState.cancelled
        with pytest.raises(Conflict):
            catalog.cancel_job(s, jid)


def test_after_commit_runs_only_on_commit():
    sent = []
    with transaction() as s:
        after_commit(s, lambda: sent.append("committed"))
    with pytest.raises(RuntimeError), transaction() as s:
        after_commit(s, lambda: sent.append("rolled back"))
        raise RuntimeError("boom")
    assert sent == ["committed"]


def test_record_upserts_one_replica_per_location_and_one_object_per_cid():
    cid, sha = f"bafkreitest{uuid.uuid4().hex}", "ab" * 32
    key = f"rec/{uuid.uuid4().hex}"
    facts = [ReplicaFact("local", key, ReplicaState.present, cid, sha, 3, verified=True),
             ReplicaFact("local", key, ReplicaState.deleting, cid, sha, 3)]
    with transaction() as s:
        ids = record(s, facts)
        record(s, [ReplicaFact("archive", key, ReplicaState.present, cid, sha, 3, verified=True)])
    with transaction() as s:
        found = replicas_at(s, [("local", key), ("archive", key)])
        assert found[("local", key)].state == ReplicaState.deleting  # the last fact wins
        assert found[("archive", key)].verified_at is not None
        assert found[("local", key)].object_id == found[("archive", key)].object_id == ids[cid]


def test_heartbeat_reports_progress_and_keeps_the_claims_of_a_long_copy():
    """A worker busy with one long object shows its progress and keeps its items: the
    sweeper does not re-send them."""
    import threading
    import time
    from types import SimpleNamespace

    from tasks.transfer import _Heartbeat

    jid = new_job(2)
    with transaction() as s:
        catalog.claim_items(s, jid, [(0, 2)], lease=timedelta(seconds=2))
    from workers.cid import ContentHasher

    hasher = ContentHasher()
    hasher.update(b"x" * 12345)
    # What the heartbeat reads of a batch in progress: its lock, the items still open,
    # and the copies under way with their hashers.
    run = SimpleNamespace(lock=threading.Lock(), open_seqs={0, 1}, in_flight={0: hasher})
    with _Heartbeat(jid, run, lease_seconds=2):
        time.sleep(3.5)  # well past the first lease
        with transaction() as s:  # the copy in flight shows in the job's progress
            assert catalog.counts(s, jid)["bytes"]["in_flight"] == 12345
        with transaction() as s:
            assert not [r for r in catalog.requeue_stalled(s, now=utcnow(), requeue_after=timedelta(hours=1))
                        if r[0] == jid]
            leases = s.scalars(select(JobItem.lease_until).where(JobItem.job_id == jid)).all()
            assert all(lease > utcnow() for lease in leases)


def test_counts_of_many_jobs_in_one_query_and_the_sweep_finds_finished_ones():
    done_job, open_job = new_job(2), new_job(3)
    with transaction() as s:
        catalog.claim_items(s, done_job, [(0, 2)], lease=timedelta(minutes=5))
        catalog.finish_items(s, done_job, [{"seq": 0, "state": ItemState.done, "size": 7},
                                           {"seq": 1, "state": ItemState.failed, "error": "x"}])
    with transaction() as s:
        both = catalog.counts_of(s, [done_job, open_job])
        assert both[done_job] == catalog.counts(s, done_job)
        assert both[done_job]["items"]["done"] == 1 and both[done_job]["bytes"]["done"] == 7
        assert both[open_job]["items"] == {**{st.value: 0 for st in ItemState}, "queued": 3, "total": 3}
        finished = catalog.finished_running_jobs(s)
        assert done_job in finished and open_job not in finished
