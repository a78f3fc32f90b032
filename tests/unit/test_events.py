"""Live events (/v1/events/stream) on the embedded SQLite catalog, through the Flask test
client: the cursor, the filters, what a caller may read, resuming with Last-Event-ID
(nothing lost, also of rows committed out of order), the 422/404/503 answers and the
bounds that end a stream; and the CLI's side: `ferry job watch` following the stream,
reconnecting with the last id, and polling only when the API has no stream."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import quote

import httpx
import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator
from sqlalchemy import func, select, update

from api import events as live
from ferry.catalog import jobs as catalog
from ferry.catalog.db import transaction
from ferry.catalog.models import ApiKey, Event, ItemState, JobKind, Replica, ReplicaState, Role, utcnow
from ferry.catalog.policies import raise_event
from ferry.catalog.replicas import ReplicaFact, record
from ferry.cli.client import Client, SseParser
from ferry.security import create_key
from ferry.settings import get_settings

POLL = 0.05


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator:
    """The API on a fresh SQLite catalog of its own."""
    from api import create_app
    from ferry.catalog.migrate import upgrade

    folder = tmp_path_factory.mktemp("events-sqlite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERRY_DATABASE_URL", f"sqlite:///{folder / 'catalog.db'}")
        mp.setenv("FERRY_EVENTS_POLL_SECONDS", str(POLL))
        get_settings.cache_clear()
        try:
            upgrade()
            yield create_app({"TESTING": True})
        finally:
            get_settings.cache_clear()


def make_key(role: Role = Role.admin, grants=()) -> str:
    with transaction() as session:
        _, key = create_key(session, name=f"events {role.value}", role=role, grants=list(grants))
    return key


@pytest.fixture(scope="module")
def admin(app) -> str:
    return make_key()


@pytest.fixture(scope="module")
def spec(app, admin) -> dict:
    return app.test_client().get("/v1/openapi.json", headers={"Authorization": f"Bearer {admin}"}).get_json()


class Stream:
    """A streamed answer of the test client, read event by event. The API's generator runs
    in this thread as it is read, so the catalog can be changed between two reads."""

    def __init__(self, response):
        self.response = response
        self.chunks = iter(response.response)
        self.parser = SseParser()
        self.lines: list[str] = []
        self.raw = ""

    def next(self) -> tuple[str, dict, str | None]:
        """The next event: (name, data, id). StopIteration once the stream has ended."""
        while True:
            while self.lines:
                event = self.parser.feed(self.lines.pop(0))
                if event is not None:
                    return event.event, event.json(), event.id
            try:
                chunk = next(self.chunks)
            except StopIteration:
                self.close()  # as a server does once the body is written
                raise
            text = chunk.decode() if isinstance(chunk, bytes) else chunk
            self.raw += text
            self.lines += text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")

    def until(self, name: str) -> list[tuple[str, dict, str | None]]:
        """Events up to and including the next `name` one."""
        seen = []
        while not seen or seen[-1][0] != name:
            seen.append(self.next())
        return seen

    def rest(self) -> list[tuple[str, dict, str | None]]:
        out = []
        try:
            while True:
                out.append(self.next())
        except StopIteration:
            return out

    def close(self) -> None:
        self.response.close()


OPENED: list[Stream] = []


@pytest.fixture(autouse=True)
def _close_streams() -> Iterator[None]:
    """Every stream a test opened is closed after it (as a client going away), freeing its slot."""
    yield
    while OPENED:
        OPENED.pop().close()
    assert live.slots.open == 0


def open_stream(app, key: str, query: str = "", headers: dict | None = None) -> Stream:
    r = app.test_client().get(f"/v1/events/stream?{query}", headers={"Authorization": f"Bearer {key}",
                                                                     **(headers or {})})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.mimetype == "text/event-stream"
    OPENED.append(Stream(r))
    return OPENED[-1]


def new_job(keys: list[str], source: str = "local", target: str | None = "archive") -> uuid.UUID:
    kind = JobKind.replicate if target else JobKind.verify
    targets = [{"backend": target, "prefix": ""}] if target else []
    with transaction() as session:
        job = catalog.create_job(session, kind=kind, source_backend=source, expand=False,
                                 spec={"source": {"backend": source, "keys": len(keys)}, "targets": targets})
        items = [catalog.NewItem(k, target or source, k, size=10) for k in keys]
        catalog.add_items(session, job.id, 0, items, batch_items=100, batch_bytes=2**30, fresh=True)
        catalog.mark_expanded(session, job, len(items))
        return job.id


def work(job_id: uuid.UUID, outcomes: dict[int, str]) -> None:
    """Workers take items and record their outcomes (and the job ends once all have one)."""
    with transaction() as session:
        catalog.claim_items(session, job_id, [(s, s + 1) for s in outcomes], lease=timedelta(minutes=5))
        catalog.finish_items(session, job_id, [{"seq": s, "state": st, "size": 10} for s, st in outcomes.items()])
    with transaction() as session:
        catalog.finish_if_complete(session, job_id)


def replica(backend: str, key: str, state: ReplicaState = ReplicaState.present) -> None:
    with transaction() as session:
        record(session, [ReplicaFact(backend, key, state, f"bafk{key.replace('/', '')}", "0" * 64, 10,
                                     verified=state == ReplicaState.present)])


def alert(kind: str = "object.lost", **about) -> None:
    with transaction() as session:
        raise_event(session, kind, "critical", f"{kind} {about}", **about)


def conforms(spec: dict, name: str, data: dict, cursor: str | None = "1.x") -> None:
    """The event matches what the spec publishes for one event, and its data the model for its name."""
    event = spec["paths"]["/v1/events/stream"]["get"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    Draft202012Validator({**event, "components": spec["components"]}).validate(
        {"event": name, "data": json.dumps(data), "id": cursor})
    [variant] = [v for v in event["oneOf"] if v["properties"]["event"]["const"] == name]
    model = variant["properties"]["data"]["contentSchema"]
    Draft202012Validator({**model, "components": spec["components"]}).validate(data)


# -- the cursor -------------------------------------------------------------------------------


def test_a_cursor_round_trips_and_garbage_is_refused():
    at = utcnow()
    c = live.Cursor(at, 42, at - timedelta(seconds=3), 7, {5: 1_700_000_000})
    back = live.Cursor.decode(c.encode(), "cursor")
    assert (back.replica_at, back.replica_id, back.jobs_at, back.alert_id, back.gaps) == (
        at, 42, at - timedelta(seconds=3), 7, {5: 1_700_000_000})
    good = c.encode()
    for bad in ["", "garbage", "2." + good[2:], good[:-3], "1.e30=", "1." + "A" * 40,
                "1.eyJyIjpbLTEsMF0sImoiOjAsImEiOjAsImciOltdfQ",  # a negative time
                "1.eyJyIjpbMS41LDBdLCJqIjowLCJhIjowLCJnIjpbXX0",  # a float
                "1.eyJyIjpbOTk5OTk5OTk5OTk5OTk5OTk5OSwwXSwiaiI6MCwiYSI6MCwiZyI6W119",  # past year 9999
                "1." + base64.urlsafe_b64encode(b"[" * 3000).decode(), "1.\u00e9t\u00e9"]:
        with pytest.raises(live.InvalidCursor):
            live.Cursor.decode(bad, "cursor")
    many = live.Cursor(at, 0, at, 500)
    many.skipped(range(1, 500), 0)
    assert len(many.gaps) == live.MAX_GAPS and min(many.gaps) == 500 - live.MAX_GAPS  # the newest are kept
    assert live.Cursor.decode(many.encode(), "cursor").gaps == many.gaps


def test_the_sse_parser_follows_the_whatwg_rules():
    p = SseParser()
    lines = ["retry: 2500", "", ": a comment", "id: one", "event: job", "data: {\"a\":", "data: 1}", "",
             ": keepalive", "id: two", "", "data:x", ""]
    got = [e for e in (p.feed(line) for line in lines) if e is not None]
    assert [(e.event, e.data, e.id) for e in got] == [("job", '{"a":\n1}', "one"), ("message", "x", "two")]
    assert p.retry == 2500 and p.last_id == "two"  # an id without data moves it on


def test_a_client_that_left_is_noticed_without_writing_to_it():
    import socket

    ours, theirs = socket.socketpair()
    try:
        assert not live.client_gone(ours)
        theirs.sendall(b"GET / HTTP/1.1\r\n")  # a pipelined request is no goodbye
        assert not live.client_gone(ours)
        theirs.close()
        ours.recv(100)
        assert live.client_gone(ours)
    finally:
        ours.close()
    assert live.client_gone(ours)  # closed here too
    assert not live.client_gone(None)  # no socket (not gunicorn): only a failed write tells


# -- answers before anything streams ----------------------------------------------------------


@pytest.mark.parametrize(("query", "field"), [
    ("until=job_done", "until"),
    ("types=job,weather", "types.1"),
    ("types=", "types"),
    ("max_seconds=-1", "max_seconds"),
    ("max_seconds=3601", "max_seconds"),
    ("max_seconds=nan", "max_seconds"),
    ("job=not-a-uuid", "job.0"),
    ("backend=" + "x" * 64, "backend.0"),
    ("since=2026-01-01T00:00:00", "since"),  # no UTC offset
    ("since=2026-01-01T00:00:00Z&cursor=1.e30", "since"),
    ("cursor=nonsense", "cursor"),
    ("types=alert&job=8a1e6c7e-1d6b-4b43-9a51-1a2b3c4d5e6f", "types"),  # alerts name no job: nothing to send
    ("types=replica&policy=p", "types"),
    ("types=replica,alert&job=8a1e6c7e-1d6b-4b43-9a51-1a2b3c4d5e6f", "types"),
    ("until=job_done&types=replica&job=8a1e6c7e-1d6b-4b43-9a51-1a2b3c4d5e6f", "types"),
    ("colour=red", "colour"),
])
def test_bad_parameters_get_422_in_the_one_error_shape(app, admin, spec, query, field):
    r = app.test_client().get(f"/v1/events/stream?{query}", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 422, (query, r.get_data(as_text=True))
    assert r.get_json()["error"]["field"] == field
    schema = spec["paths"]["/v1/events/stream"]["get"]["responses"]["422"]["content"]["application/json"]["schema"]
    Draft202012Validator({**schema, "components": spec["components"]}).validate(r.get_json())


def test_a_bad_last_event_id_gets_422(app, admin):
    r = app.test_client().get("/v1/events/stream", headers={"Authorization": f"Bearer {admin}",
                                                            "Last-Event-ID": "1.not-ours"})
    assert r.status_code == 422 and r.get_json()["error"] == {
        "code": "invalid_cursor", "message": "Last-Event-ID: not an event id this API gave", "field": "Last-Event-ID"}


def test_an_unknown_job_gets_404_before_streaming(app, admin):
    r = app.test_client().get(f"/v1/events/stream?job={uuid.uuid4()}", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 404 and r.is_json and r.get_json()["error"]["code"] == "job_not_found"


def test_beyond_max_streams_503_with_retry_after(app, admin, monkeypatch):
    monkeypatch.setenv("FERRY_EVENTS_MAX_STREAMS", "1")
    get_settings.cache_clear()
    try:
        first = open_stream(app, admin, "max_seconds=30")
        r = app.test_client().get("/v1/events/stream?max_seconds=0", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 503 and r.headers["Retry-After"] == str(live.BUSY_RETRY_AFTER)
        assert r.get_json()["error"]["code"] == "too_many_streams"
        assert "FERRY_EVENTS_MAX_STREAMS" in r.get_json()["error"]["message"]
        first.close()  # the client went: its slot is free
        assert live.slots.open == 0
        again = open_stream(app, admin, "max_seconds=0")
        assert again.until("end")[-1][1] == {"reason": "max_seconds"}
        again.close()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert live.slots.open == 0


# -- what streams --------------------------------------------------------------------------------


def test_job_progress_then_the_terminal_event_then_the_end(app, admin, spec):
    job_id = new_job([f"prog/{i}" for i in range(3)])
    s = open_stream(app, admin, f"job={job_id}&until=job_done&max_seconds=10")
    name, first, _ = s.next()  # the state it is in when the stream begins
    assert name == "job" and first["id"] == str(job_id) and first["state"] == "running"
    assert first["items"]["queued"] == 3
    got = app.test_client().get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {admin}"}).get_json()
    assert first == got  # shaped as GET /v1/jobs/{id} shapes it
    conforms(spec, "job", first)
    work(job_id, {0: ItemState.done})
    name, second, _ = s.next()
    assert name == "job" and second["items"]["done"] == 1 and second["bytes"]["done"] == 10
    work(job_id, {1: ItemState.done, 2: ItemState.failed})
    name, last, _ = s.next()
    assert name == "job" and last["state"] == "partially_failed" and last["finished_at"]
    assert s.next()[:2] == ("end", {"reason": "job_done"})
    with pytest.raises(StopIteration):
        s.next()
    assert live.slots.open == 0  # read to the end: released


def test_a_job_that_already_ended_gives_its_state_and_the_end_at_once(app, admin):
    job_id = new_job(["ended/0"])
    work(job_id, {0: ItemState.done})
    started = time.monotonic()
    events = open_stream(app, admin, f"job={job_id}&until=job_done&types=job").rest()
    assert [(e[0], e[1].get("state") or e[1].get("reason")) for e in events] == [("job", "succeeded"),
                                                                                 ("end", "job_done")]
    assert time.monotonic() - started < 2


def test_get_v1_events_streams_to_a_client_that_asks_for_server_sent_events(app, admin):
    job_id = new_job(["negotiated/0"])
    work(job_id, {0: ItemState.done})
    auth = {"Authorization": f"Bearer {admin}"}
    r = app.test_client().get(f"/v1/events?job={job_id}&until=job_done&types=job",
                              headers={**auth, "Accept": "text/event-stream"})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    OPENED.append(Stream(r))
    events = OPENED[-1].rest()
    assert [(e[0], e[1].get("state") or e[1].get("reason")) for e in events] == [("job", "succeeded"),
                                                                                 ("end", "job_done")]
    listed = app.test_client().get("/v1/events", headers=auth)  # the JSON list, as before
    assert listed.status_code == 200 and "events" in listed.get_json()
    quiet = app.test_client().get("/v1/events?max_seconds=0", headers={**auth, "Accept": "text/event-stream"})
    assert quiet.status_code == 200 and quiet.mimetype == "text/event-stream"
    OPENED.append(Stream(quiet))
    assert app.test_client().get("/v1/events?types=bogus", headers={**auth, "Accept": "text/event-stream"}) \
        .status_code == 422
    assert app.test_client().get("/v1/events", headers={"Accept": "text/event-stream"}).status_code == 401


def test_max_seconds_ends_a_quiet_stream_and_keepalives_carry_the_cursor(app, admin, monkeypatch):
    monkeypatch.setattr(live, "KEEPALIVE_SECONDS", 0.1)
    started, began = time.monotonic(), utcnow()
    s = open_stream(app, admin, "max_seconds=0.5&types=alert,replica")
    assert s.rest()[-1][:2] == ("end", {"reason": "max_seconds"})
    assert 0.5 <= time.monotonic() - started < 2
    assert s.raw.startswith(f"retry: {live.RETRY_MS}\n\n")
    assert ": keepalive\nid: 1." in s.raw
    keepalive_id = s.raw.split(": keepalive\nid: ")[-1].split("\n")[0]
    # A quiet stream's cursor moves on all the same: a client resuming from it reads no
    # further back than it must.
    assert live.Cursor.decode(keepalive_id, "cursor").replica_at > began


def test_replica_changes_and_alerts_with_filters(app, admin, spec):
    s = open_stream(app, admin, "backend=mirror&max_seconds=10")
    replica("local", "f/one")                       # another backend: not sent
    replica("mirror", "f/one")
    alert(cid="bafkx", backend="local")               # about another backend
    alert(cid="bafky", backend="mirror")
    alert(kind="policy.failed", policy="p1")          # about no backend
    name, data, _ = s.next()
    # Alerts are read before replicas in each look at the catalog.
    assert (name, data["backend"], data["cid"]) == ("alert", "mirror", "bafky")
    conforms(spec, "alert", data)
    name, data, _ = s.next()
    assert (name, data["backend"], data["key"], data["state"]) == ("replica", "mirror", "f/one", "present")
    assert data["cid"] == "bafkfone" and data["verified_at"]
    conforms(spec, "replica", data)
    replica("mirror", "f/one", ReplicaState.bad)
    name, data, _ = s.next()
    assert (name, data["state"]) == ("replica", "bad")
    s.close()

    p = open_stream(app, admin, "policy=p2&max_seconds=10")
    alert(kind="policy.failed", policy="p1")
    alert(kind="policy.failed", policy="p2")
    replica("mirror", "f/two")  # replicas name no policy
    name, data, _ = p.next()
    assert (name, data["policy"]) == ("alert", "p2")
    p.close()


def test_a_job_filter_sends_that_job_only(app, admin):
    job_id = new_job(["jf/a", "jf/b"], source="local", target="mirror")
    other = new_job(["jf/c"], source="local", target="mirror")
    s = open_stream(app, admin, f"job={job_id}&max_seconds=10")
    assert s.next()[1]["id"] == str(job_id)
    replica("mirror", "jf/a")  # where the job copies to: still no replica event (they name no job)
    alert(cid="bafkjf", backend="mirror")
    work(other, {0: ItemState.done})
    work(job_id, {0: ItemState.done})
    name, data, _ = s.next()
    assert (name, data["id"], data["items"]["done"]) == ("job", str(job_id), 1)


def test_a_restricted_caller_hears_only_of_backends_it_may_read(app, admin):
    viewer = make_key(Role.viewer, [{"backends": "local", "access": "read"}])
    hidden_job = new_job(["perm/x"], source="local", target="archive")  # archive: not readable
    r = app.test_client().get(f"/v1/events/stream?job={hidden_job}", headers={"Authorization": f"Bearer {viewer}"})
    assert r.status_code == 403 and r.get_json()["error"]["details"]["missing"] == "read:archive"
    r = app.test_client().get("/v1/events/stream?backend=mirror", headers={"Authorization": f"Bearer {viewer}"})
    assert r.status_code == 403 and r.get_json()["error"]["details"]["missing"] == "read:mirror"

    s = open_stream(app, viewer, "max_seconds=10")
    visible_job = new_job(["perm/y"], source="local", target=None)  # a verify job on local only
    work(hidden_job, {0: ItemState.done})
    replica("mirror", "perm/m")
    replica("local", "perm/l")
    alert(cid="bafkm", backend="mirror")
    alert(cid="bafkn")  # about no backend, as GET /v1/events shows every reader
    got = s.until("job")
    assert [(n, d["id"] if n == "job" else d["backend"]) for n, d, _ in got] == [
        ("alert", None), ("replica", "local"), ("job", str(visible_job))]
    assert got[0][1]["cid"] == "bafkn"
    work(visible_job, {0: ItemState.done})
    name, data, _ = s.next()  # and nothing of the hidden job, or of mirror, came before it
    assert (name, data["id"], data["state"]) == ("job", str(visible_job), "succeeded")


def test_resuming_with_last_event_id_loses_nothing(app, admin):
    job_id = new_job([f"res/{i}" for i in range(4)])
    s = open_stream(app, admin, "max_seconds=10")
    first = [s.next() for _ in range(1)]  # the open job's state as the stream begins
    assert first[0][0] == "job"
    alert(cid="bafkr1")
    replica("archive", "res/0")
    seen = s.until("replica")
    last_id = seen[-1][2]
    s.close()  # the connection drops

    # While away: alerts, replica changes, the job ends.
    alert(cid="bafkr2")
    replica("archive", "res/1")
    replica("archive", "res/2")
    work(job_id, {0: ItemState.done, 1: ItemState.done, 2: ItemState.done, 3: ItemState.done})

    back = open_stream(app, admin, "max_seconds=10", headers={"Last-Event-ID": last_id})
    got = []
    while not any(n == "job" and d["state"] == "succeeded" for n, d, _ in got):
        got.append(back.next())
    back.close()
    alerts = [d["cid"] for n, d, _ in first + seen + got if n == "alert"]
    assert alerts.count("bafkr1") == 1 and alerts.count("bafkr2") == 1  # each alert once
    keys = {d["key"] for n, d, _ in got if n == "replica"}
    assert {"res/1", "res/2"} <= keys  # missed ones told (res/0 may come again: states repeat harmlessly)
    # The `cursor` parameter resumes the same way, for clients that cannot set headers.
    again = open_stream(app, admin, f"cursor={last_id}&types=alert&max_seconds=0").rest()
    assert [d["cid"] for n, d, _ in again if n == "alert"] == ["bafkr2"]


def test_after_a_resume_only_the_last_seconds_come_again(app, admin, monkeypatch):
    monkeypatch.setattr(live, "SETTLE", timedelta(seconds=0.3))
    job_id = new_job(["again/0"])
    s = open_stream(app, admin, "types=job&max_seconds=1")
    while s.next()[1]["id"] != str(job_id):  # the open jobs' states as the stream begins (ours is the newest)
        pass
    work(job_id, {0: ItemState.done})
    name, data, at_end = s.next()
    assert (name, data["id"], data["state"]) == ("job", str(job_id), "succeeded")
    name, _, later = s.next()  # the stream's own end, well over SETTLE after the job's
    assert name == "end"
    soon = open_stream(app, admin, "types=job&max_seconds=0", headers={"Last-Event-ID": at_end}).rest()
    assert str(job_id) in [d.get("id") for _, d, _ in soon]  # within SETTLE of the cursor: told again
    after = open_stream(app, admin, "types=job&max_seconds=0", headers={"Last-Event-ID": later}).rest()
    assert str(job_id) not in [d.get("id") for _, d, _ in after]


def test_rows_committed_out_of_order_are_not_lost(app, admin):
    s = open_stream(app, admin, "types=replica,alert&max_seconds=10")
    replica("mirror", "ooo/now")
    assert s.next()[1]["key"] == "ooo/now"
    # A replica stamped two seconds ago that committed only now (a slow transaction, a
    # host whose clock is behind): the stream's cursor is already past it.
    with transaction() as session:
        session.execute(update(Replica).where(Replica.key == "ooo/now")
                        .values(state=ReplicaState.suspect, updated_at=utcnow() - timedelta(seconds=2)))
    name, data, _ = s.next()
    assert (name, data["key"], data["state"]) == ("replica", "ooo/now", "suspect")
    # An alert id taken before another's that committed first.
    with transaction() as session:
        top = session.scalar(select(func.max(Event.id))) or 0
        session.add(Event(id=top + 2, kind="x.late", severity="info", message="second", details={}))
    assert s.next()[1]["id"] == top + 2
    with transaction() as session:
        session.add(Event(id=top + 1, kind="x.late", severity="info", message="first", details={}))
    name, data, skipped_id = s.next()
    assert (name, data["id"]) == ("alert", top + 1)
    s.close()
    # Resumed from there: neither is told again.
    again = open_stream(app, admin, "types=alert&max_seconds=0", headers={"Last-Event-ID": skipped_id}).rest()
    assert [e for e in again if e[0] == "alert"] == []


def test_since_replays_from_an_instant(app, admin):
    before = utcnow()
    alert(cid="bafksince")
    replica("mirror", "since/a")
    job_id = new_job(["since/j"])
    work(job_id, {0: ItemState.done})
    events = open_stream(app, admin, f"since={before.isoformat().replace('+00:00', 'Z')}&max_seconds=0").rest()
    assert ("alert", "bafksince") in [(n, d.get("cid")) for n, d, _ in events]
    assert ("replica", "since/a") in [(n, d.get("key")) for n, d, _ in events]
    assert ("job", str(job_id), "succeeded") in [(n, d.get("id"), d.get("state")) for n, d, _ in events]
    # From now, none of it is news (open jobs' states aside: a stream begins with them).
    now = open_stream(app, admin, "max_seconds=0").rest()
    assert [e for e in now if e[0] != "job" or e[1]["state"] not in ("pending", "running")] == [now[-1]]
    assert now[-1][0] == "end"


def test_catching_up_reads_page_after_page(app, admin, monkeypatch):
    monkeypatch.setattr(live, "PAGE", 2)
    before = quote(utcnow().isoformat())
    for i in range(5):
        replica("archive", f"page/{i}")
        alert(cid=f"bafkpage{i}")
    ended = [new_job([f"page/j{i}"]) for i in range(3)]
    for job_id in ended:
        work(job_id, {0: ItemState.done})
    events = open_stream(app, admin, f"since={before}&max_seconds=0.5").rest()
    assert [d["key"] for n, d, _ in events if n == "replica"] == [f"page/{i}" for i in range(5)]
    assert [d["cid"] for n, d, _ in events if n == "alert"] == [f"bafkpage{i}" for i in range(5)]
    told = [d["id"] for n, d, _ in events if n == "job" and d["state"] == "succeeded"]
    assert told == [str(j) for j in ended]  # in the order they ended, each once


def test_an_unchanged_job_is_not_told_again(app, admin):
    job_id = new_job(["same/0"])
    started = time.monotonic()
    events = open_stream(app, admin, f"job={job_id}&types=job&max_seconds=0.4").rest()
    assert time.monotonic() - started >= 0.4  # several looks at the catalog
    assert [(n, d.get("state") or d.get("reason")) for n, d, _ in events] == [("job", "running"),
                                                                                ("end", "max_seconds")]


def test_a_stream_whose_client_left_ends_at_its_next_look(app, admin):
    with transaction() as session:
        filters = live.Filters(jobs=(), policies=frozenset(), backends=frozenset(), types=frozenset({"alert"}),
                               readable=None, until_done=False)
        stream = live.EventStream.starting(session, filters, utcnow())
    left = []
    started = time.monotonic()
    text = list(live.frames(stream, poll=POLL, max_seconds=10, token=None, gone=lambda: len(left) > 2 or
                            bool(left.append(1))))
    assert text == [f"retry: {live.RETRY_MS}\n\n"]  # and no end: nobody is there to read it
    assert time.monotonic() - started < 1


def test_a_revoked_key_ends_its_stream(app, monkeypatch):
    monkeypatch.setattr(live, "REAUTH_SECONDS", 0.0)
    key = make_key(Role.viewer)
    s = open_stream(app, key, "types=alert&max_seconds=10")
    with transaction() as session:
        session.execute(update(ApiKey).where(ApiKey.prefix == key.split("_")[1]).values(revoked_at=utcnow()))
    assert s.until("end")[-1][1] == {"reason": "unauthenticated"}


# -- the CLI's side ------------------------------------------------------------------------------


def job_body(state: str, done: int) -> dict:
    return {"id": "8a1e6c7e-1d6b-4b43-9a51-1a2b3c4d5e6f", "kind": "replicate", "state": state,
            "source": {"backend": "local", "keys": 2}, "targets": [{"backend": "archive", "prefix": ""}],
            "keep_source": False, "total": 2, "error": None, "created_at": "2026-12-02T00:00:00Z",
            "started_at": "2026-12-02T00:00:00Z", "finished_at": None,
            "items": {"queued": 2 - done, "running": 0, "done": done, "failed": 0, "skipped": 0, "cancelled": 0,
                      "stuck": 0, "total": 2}, "bytes": {"done": done, "known": 2, "in_flight": 0}}


class Dropping(httpx.SyncByteStream):
    """A stream body that breaks after some bytes, as a dropped connection does."""

    def __init__(self, *parts: bytes):
        self.parts = parts

    def __iter__(self):
        yield from self.parts
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def sse(event: str, data: dict, cursor: str) -> bytes:
    return f"id: {cursor}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()


def mock_client(handler) -> Client:
    c = Client("http://ferry.test", "fy_test_key")
    c.http = httpx.Client(base_url="http://ferry.test", transport=httpx.MockTransport(handler))
    return c


def test_watch_follows_the_stream_and_reconnects_with_the_last_event_id(monkeypatch):
    from ferry.cli import main

    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append((request.url.path, dict(request.url.params), request.headers.get("Last-Event-ID")))
        if len(asked) == 1:
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  stream=Dropping(b"retry: 10\n\n", sse("job", job_body("running", 1), "c1")))
        done = {**job_body("succeeded", 2), "finished_at": "2026-12-02T00:00:05Z"}
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=sse("job", done, "c2") + sse("end", {"reason": "job_done"}, "c2"))

    monkeypatch.setattr(main, "client", lambda: mock_client(handler))
    result = CliRunner().invoke(main.cli, ["job", "watch", job_body("x", 0)["id"], "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "succeeded"
    assert [a[0] for a in asked] == ["/v1/events/stream"] * 2  # no polling
    assert asked[0][1] == {"job": job_body("x", 0)["id"], "types": "job", "until": "job_done"}
    assert (asked[0][2], asked[1][2]) == (None, "c1")


def test_watch_exits_1_for_a_job_with_failed_items(monkeypatch):
    from ferry.cli import main

    failed = {**job_body("partially_failed", 1), "finished_at": "2026-12-02T00:00:05Z"}
    failed["items"] = {**failed["items"], "queued": 0, "failed": 1}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=sse("job", failed, "c1") + sse("end", {"reason": "job_done"}, "c1"))

    monkeypatch.setattr(main, "client", lambda: mock_client(handler))
    result = CliRunner().invoke(main.cli, ["job", "watch", failed["id"], "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["state"] == "partially_failed"


def test_watch_polls_only_when_the_api_has_no_event_stream(monkeypatch):
    from ferry.cli import main

    states = iter([job_body("running", 1), {**job_body("succeeded", 2), "finished_at": "2026-12-02T00:00:05Z"}])

    def old_api(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/events/stream":  # an API from before live events
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "Not Found"}})
        return httpx.Response(200, json=next(states))

    monkeypatch.setattr(main, "client", lambda: mock_client(old_api))
    result = CliRunner().invoke(main.cli, ["job", "watch", job_body("x", 0)["id"], "--json"])
    assert result.exit_code == 0, result.output
    assert "polling the job instead" in result.stderr

    def unknown_job(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "job_not_found", "message": "no job x"}})

    monkeypatch.setattr(main, "client", lambda: mock_client(unknown_job))
    result = CliRunner().invoke(main.cli, ["job", "watch", "x"])
    assert result.exit_code == 2 and "no job x" in result.stderr and "polling" not in result.stderr


def test_ferry_events_prints_lines_or_ndjson_and_stops_at_its_bound(monkeypatch):
    from ferry.cli import main

    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.params)
        body = (sse("replica", {"cid": "bafkq", "backend": "mirror", "key": "a/b", "state": "bad", "verified_at": None,
                                "last_error": "sha256 differs", "updated_at": "2026-12-02T00:00:00Z"}, "c1")
                + sse("alert", {"id": 3, "created_at": "2026-12-02T00:00:00Z", "kind": "object.lost",
                                "severity": "critical", "message": "object bafkq lost", "cid": "bafkq", "policy": None,
                                "backend": None, "details": {}}, "c2")
                + sse("end", {"reason": "max_seconds"}, "c2"))
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=body)

    from ferry.cli import policy  # `ferry events` lives there

    monkeypatch.setattr(policy, "client", lambda: mock_client(handler))
    result = CliRunner().invoke(main.cli, ["events", "--backend", "mirror", "--backend", "local", "--types",
                                           "replica,alert", "--max-seconds", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "replica  mirror:a/b bad bafkq (sha256 differs)" in lines[0]
    assert "alert    critical object.lost: object bafkq lost" in lines[1]
    assert asked[0].get_list("backend") == ["mirror", "local"] and asked[0]["types"] == "replica,alert"
    assert 0 < float(asked[0]["max_seconds"]) <= 2
    result = CliRunner().invoke(main.cli, ["events", "--follow", "--json", "--max-seconds", "1"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["event"] for line in result.stdout.splitlines()] == ["replica", "alert"]
    assert json.loads(result.stdout.splitlines()[1])["id"] == "c2"
    result = CliRunner().invoke(main.cli, ["events", "--follow", "--kind", "object.lost"])
    assert result.exit_code == 2 and "--types alert" in result.output
