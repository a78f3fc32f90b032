"""/v1/events/stream: live events as server-sent events (job progress, replica state
changes, alerts), for `ferry job watch`, `ferry events --follow` and dashboards.

The catalog is the one source of truth, and a stream must work however many API processes
serve it and on the embedded SQLite catalog: each stream reads the catalog every
FERRY_EVENTS_POLL_SECONDS from a cursor (no in-process bus), and holds no database
connection between reads.

- `alert`: a new row of `events` (what GET /v1/events lists), in id order;
- `replica`: a replica whose row changed since the cursor, as it is now (the state before
  is not kept anywhere, so it is not told);
- `job`: a job whose counts, bytes or state changed, shaped as GET /v1/jobs/{id} shapes it;
  a job's event in a terminal state is its last. A stream given `job` starts with their
  state as it is.

Every event's `id:` is the cursor of what the stream has read; a client that reconnects
with it (Last-Event-ID, or `cursor`) loses nothing. Writers commit out of order (a
transaction's timestamps and ids are taken before it commits, on hosts whose clocks
differ), so each read looks again at the last SETTLE of replica changes for rows committed
late, and alert ids skipped over are looked for again for ALERT_SETTLE_SECONDS. After a
reconnect, replica and job events of the last few seconds may come again (they are
states, so a repeat is harmless); alerts come once.
"""

from __future__ import annotations

import base64
import json
import logging
import select as io_select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import BigInteger, bindparam, func, or_, select, tuple_
from sqlalchemy.orm import Session

from api import access
from api.access import current
from api.jobs import job_out
from api.openapi import operation
from api.schemas import EventOut, EventStreamQuery, JobOut, ReplicaEvent, StreamEnd
from api.search import readable
from ferry.catalog import jobs as catalog
from ferry.catalog.db import transaction
from ferry.catalog.models import (
    Event,
    Job,
    JobItem,
    JobKind,
    JobState,
    Replica,
    StoredObject,
    UTCDateTime,
    utcnow,
)
from ferry.errors import FerryError, InvalidRequest
from ferry.security import Unauthenticated, require_backends
from ferry.settings import get_settings

log = logging.getLogger(__name__)

bp = Blueprint("event_stream", __name__, url_prefix="/v1/events/stream")

EVENT_MODELS = {"job": JobOut, "replica": ReplicaEvent, "alert": EventOut, "end": StreamEnd}
# How late a replica change may commit after a later-stamped one and still be told: the
# longest transaction that writes replicas plus the clock skew between hosts.
SETTLE = timedelta(seconds=10)
# Alerts are raised inside a reconcile pass, whose transaction can last minutes.
ALERT_SETTLE_SECONDS = 600
MAX_GAPS = 100          # alert ids looked for again, at most (the cursor carries them)
PAGE = 500              # rows of one kind read at once; a stream catching up reads again at once
KEEPALIVE_SECONDS = 15.0
REAUTH_SECONDS = 60.0   # a revoked or expired credential ends its streams this soon
RETRY_MS = 3000         # the `retry:` a client waits before reconnecting
BUSY_RETRY_AFTER = 5
OPEN_JOB_STATES = (JobState.pending, JobState.running)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MAX_INT64 = 2**63 - 1


class InvalidCursor(InvalidRequest):
    """Raised when a Last-Event-ID or `cursor` is not an event id this API gave."""

    code = "invalid_cursor"


class TooManyStreams(FerryError):
    """Raised when this API process already serves FERRY_EVENTS_MAX_STREAMS streams."""

    code = "too_many_streams"
    status = 503


def _us(at: datetime) -> int:
    return (at - _EPOCH) // _MICROSECOND


def _at(us: int) -> datetime:
    return _EPOCH + us * _MICROSECOND


@dataclass
class Cursor:
    """How far a stream has read: replicas by (updated_at, id), jobs by finished_at,
    alerts by id, and the alert ids skipped over (with when they were first missed)."""

    replica_at: datetime
    replica_id: int
    jobs_at: datetime
    alert_id: int
    gaps: dict[int, int] = field(default_factory=dict)

    def encode(self) -> str:
        raw = json.dumps({"r": [_us(self.replica_at), self.replica_id], "j": _us(self.jobs_at), "a": self.alert_id,
                          "g": sorted(self.gaps.items())}, separators=(",", ":"))
        return "1." + base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, source: str) -> Cursor:
        try:
            version, _, body = text.partition(".")
            if version != "1":
                raise ValueError(version)
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            (rt, rid), jt, aid, gaps = data["r"], data["j"], data["a"], data["g"]
            pairs = [(g, s) for g, s in gaps]
            numbers = [rt, rid, jt, aid, *(n for pair in pairs for n in pair)]
            if len(pairs) > MAX_GAPS or not all(type(n) is int and 0 <= n <= _MAX_INT64 for n in numbers):
                raise ValueError(numbers)
            return cls(_at(rt), rid, _at(jt), aid, dict(pairs))
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            raise InvalidCursor(f"{source}: not an event id this API gave", field=source) from None

    def skipped(self, ids: range, seen_at: int) -> None:
        for i in ids[-MAX_GAPS:]:
            self.gaps[i] = seen_at
        while len(self.gaps) > MAX_GAPS:  # the oldest ids give way
            del self.gaps[min(self.gaps)]

    def expire_gaps(self, now: int) -> None:
        for i, seen in list(self.gaps.items()):
            if now - seen > ALERT_SETTLE_SECONDS:
                del self.gaps[i]


@dataclass(frozen=True)
class Filters:
    jobs: tuple[uuid.UUID, ...]
    policies: frozenset[str]
    backends: frozenset[str]
    types: frozenset[str]            # what the filters leave to send
    readable: frozenset[str] | None  # the backends the caller may read; None: every one
    until_done: bool


def effective_types(query: EventStreamQuery) -> frozenset[str]:
    """The types asked for, less those a filter rules out: alerts and replicas name no job,
    replicas no policy. (Replicas could be matched to a job's items by location, but
    job_items has no index on its locations: on Postgres that is a nested loop over every
    item of the job for each replica changed, each poll.)"""
    types = set(query.types)
    if query.job:
        types -= {"alert", "replica"}
    if query.policy:
        types.discard("replica")
    return frozenset(types)


def job_about(session: Session, job: Job) -> tuple[frozenset[str], frozenset[str]]:
    """The backends a job names (its source and targets; a reconcile job's are its items')
    and the policies its work serves."""
    spec = job.spec or {}
    names = {job.source_backend, *(t.get("backend") for t in spec.get("targets", []) if isinstance(t, dict))}
    policies: set[str | None] = set()
    if job.kind == JobKind.reconcile:
        i = JobItem.__table__.c
        for source, dest, policy in session.execute(
                select(i.source_backend, i.dest_backend, i.policy).where(i.job_id == job.id).distinct()):
            names |= {source, dest}
            policies.add(policy)
    # "@search" (index items' destination) is no backend.
    return (frozenset(n for n in names if n and not n.startswith("@")), frozenset(p for p in policies if p))


def _when(at: datetime) -> Any:
    return bindparam(None, at, type_=UTCDateTime())


def _key(at: datetime, row_id: int) -> Any:
    return tuple_(_when(at), bindparam(None, row_id, type_=BigInteger()))


Emitted = tuple[str, dict[str, Any], str]  # event, data, the cursor after it


class EventStream:
    """One stream's reading of the catalog: `poll` returns what changed since the last one."""

    def __init__(self, filters: Filters, cursor: Cursor):
        self.filters = filters
        self.cursor = cursor
        self.sent: set[tuple[int, datetime]] = set()  # replica changes told, within SETTLE of the cursor
        self.last_job: dict[uuid.UUID, dict[str, Any]] = {}  # what was told of each job
        self.finished: dict[uuid.UUID, datetime] = {}       # when those that ended did
        self.about: dict[uuid.UUID, tuple[frozenset[str], frozenset[str]]] = {}
        self.quiet: set[uuid.UUID] = set()  # jobs that ended before the stream began
        self.ended: set[uuid.UUID] = set()  # jobs of `until` whose terminal event was sent

    @classmethod
    def starting(cls, session: Session, filters: Filters, at: datetime) -> EventStream:
        """A stream of what happens after `at` (now, or `since`)."""
        e = Event.__table__.c
        alert_id = session.scalar(select(func.max(e.id)).where(e.created_at <= _when(at))) or 0
        cursor = Cursor(at, 0, at, alert_id)
        # Ids below alert_id still uncommitted at `at` are looked for as though skipped.
        settled = at - timedelta(seconds=ALERT_SETTLE_SECONDS)
        recent = set(session.scalars(select(e.id).where(e.created_at > _when(settled), e.id <= alert_id)))
        if recent:
            cursor.skipped(range(min(recent), alert_id + 1), int(time.time()))
            for i in recent:
                cursor.gaps.pop(i, None)
        stream = cls(filters, cursor)
        if "replica" in filters.types:  # what changed just before `at` is not news
            r = Replica.__table__.c
            stream.sent = {(i, u) for i, u in session.execute(
                select(r.id, r.updated_at).where(r.updated_at > _when(at - SETTLE), r.updated_at <= _when(at)))}
        if not filters.jobs:
            stream.quiet = set(session.scalars(select(Job.id).where(Job.finished_at > _when(at - SETTLE),
                                                                    Job.finished_at <= _when(at))))
        return stream

    @property
    def done(self) -> bool:
        return self.filters.until_done and set(self.filters.jobs) <= self.ended

    def poll(self, session: Session) -> tuple[list[Emitted], bool]:
        """The events since the last poll, and whether more are waiting (a page was full)."""
        now = utcnow()
        out: list[Emitted] = []
        more = False
        if "alert" in self.filters.types:
            more |= self._alerts(session, out)
        if "replica" in self.filters.types:
            more |= self._replicas(session, out, now)
        if "job" in self.filters.types:
            more |= self._jobs(session, out, now)
        return out, more

    # -- alerts ------------------------------------------------------------------------

    def _alerts(self, session: Session, out: list[Emitted]) -> bool:
        c = self.cursor
        e = Event.__table__.c
        wanted = e.id > c.alert_id
        if c.gaps:
            wanted = or_(wanted, e.id.in_(sorted(c.gaps)))
        rows = session.scalars(select(Event).where(wanted).order_by(Event.id).limit(PAGE)).all()
        seen_at = int(time.time())
        for row in rows:
            if row.id in c.gaps:
                del c.gaps[row.id]
            elif row.id > c.alert_id:
                c.skipped(range(c.alert_id + 1, row.id), seen_at)
                c.alert_id = row.id
            if self._alert_wanted(row):
                out.append(("alert", EventOut.model_validate(row, from_attributes=True).model_dump(mode="json"),
                            c.encode()))
        c.expire_gaps(seen_at)
        return len(rows) == PAGE

    def _alert_wanted(self, row: Event) -> bool:
        f = self.filters
        if f.readable is not None and row.backend is not None and row.backend not in f.readable:
            return False
        if f.backends and row.backend not in f.backends:
            return False
        return not f.policies or row.policy in f.policies

    # -- replicas ----------------------------------------------------------------------

    def _replicas(self, session: Session, out: list[Emitted], now: datetime) -> bool:
        c = self.cursor
        r, o = Replica.__table__.c, StoredObject.__table__.c
        base = (select(r.id, r.updated_at, r.backend, r.key, r.state, r.verified_at, r.last_error, o.cid)
                .join_from(Replica.__table__, StoredObject.__table__, o.id == r.object_id)
                .where(*self._replica_conditions()))
        rows = session.execute(base.where(tuple_(r.updated_at, r.id) > _key(c.replica_at, c.replica_id))
                               .order_by(r.updated_at, r.id).limit(PAGE)).all()
        for row in rows:
            c.replica_at, c.replica_id = row.updated_at, row.id
            self._replica_event(row, out)
        if len(rows) == PAGE:
            return True
        # Caught up. Rows stamped before the cursor but committed since are told now.
        late = session.execute(base.where(r.updated_at > _when(c.replica_at - SETTLE),
                                          tuple_(r.updated_at, r.id) <= _key(c.replica_at, c.replica_id))
                               .order_by(r.updated_at, r.id)).all()
        for row in late:
            self._replica_event(row, out)
        if now > c.replica_at:  # nothing else the filters match was committed up to now
            c.replica_at, c.replica_id = now, 0
        horizon = c.replica_at - SETTLE
        self.sent = {k for k in self.sent if k[1] > horizon}
        return False

    def _replica_conditions(self) -> list[Any]:
        f = self.filters
        r = Replica.__table__.c
        conditions = []
        if f.readable is not None:
            conditions.append(r.backend.in_(sorted(f.readable)))
        if f.backends:
            conditions.append(r.backend.in_(sorted(f.backends)))
        return conditions

    def _replica_event(self, row: Any, out: list[Emitted]) -> None:
        key = (row.id, row.updated_at)
        if key in self.sent:
            return
        self.sent.add(key)
        data = ReplicaEvent(cid=row.cid, backend=row.backend, key=row.key, state=row.state, verified_at=row.verified_at,
                            last_error=row.last_error, updated_at=row.updated_at)
        out.append(("replica", data.model_dump(mode="json"), self.cursor.encode()))

    # -- jobs --------------------------------------------------------------------------

    def _jobs(self, session: Session, out: list[Emitted], now: datetime) -> bool:
        f, c = self.filters, self.cursor
        if f.jobs:
            candidates = list(session.scalars(select(Job).where(Job.id.in_(f.jobs))))
            more = False
        else:
            candidates = list(session.scalars(select(Job).where(Job.state.in_(OPEN_JOB_STATES))))
            # Ends from the cursor on (a tie at the cursor is told once: last_job knows it) ...
            ended = list(session.scalars(select(Job).where(Job.finished_at >= _when(c.jobs_at))
                                         .order_by(Job.finished_at, Job.id).limit(PAGE)))
            more = len(ended) == PAGE
            if not more:  # ... and, caught up, ends stamped before it that committed since
                ended += session.scalars(select(Job).where(Job.finished_at > _when(c.jobs_at - SETTLE),
                                                           Job.finished_at < _when(c.jobs_at)))
            known = {j.id for j in candidates}
            candidates += [j for j in ended if j.id not in known]
        # Open jobs first, then the ended ones in the order they ended: the cursor passes
        # each end only once it is told.
        candidates.sort(key=lambda j: (j.finished_at is not None, j.finished_at or j.created_at, str(j.id)))
        wanted = [j for j in candidates
                  if not (j.id in self.quiet and j.state.terminal) and self._job_wanted(session, j)]
        counts = catalog.counts_of(session, [j.id for j in wanted])
        wanted_ids = set(counts)
        for job in candidates:
            if job.finished_at is not None and job.finished_at > c.jobs_at:
                c.jobs_at = job.finished_at
            if job.id not in wanted_ids:
                continue
            shaped = job_out(job, counts[job.id])
            if self.last_job.get(job.id) != shaped:
                self.last_job[job.id] = shaped
                out.append(("job", shaped, c.encode()))
            if job.finished_at is not None:
                self.finished[job.id] = job.finished_at
            else:
                self.finished.pop(job.id, None)
            if job.state.terminal and job.id in f.jobs:
                self.ended.add(job.id)
        if not more and now > c.jobs_at:  # every end up to now is told
            c.jobs_at = now
        # Forget jobs that ended too long before the cursor to be read again.
        present, horizon = {j.id for j in candidates}, c.jobs_at - SETTLE
        for gone in [k for k in self.last_job if k not in present and self.finished.get(k, horizon) <= horizon]:
            del self.last_job[gone]
            self.about.pop(gone, None)
            self.finished.pop(gone, None)
        self.quiet -= {j.id for j in candidates if not j.state.terminal}  # reopened: news again
        return more

    def _job_wanted(self, session: Session, job: Job) -> bool:
        f = self.filters
        if f.jobs and job.id not in f.jobs:
            return False
        if job.id not in self.about:
            self.about[job.id] = job_about(session, job)
        backends, policies = self.about[job.id]
        if f.readable is not None and not backends <= f.readable:
            return False
        if f.backends and not backends & f.backends:
            return False
        return not f.policies or bool(policies & f.policies)


# -- the HTTP side ---------------------------------------------------------------------------


class _Slots:
    """The streams this process serves: each holds one of gunicorn's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0

    def take(self, limit: int) -> Callable[[], None] | None:
        """A release function, or None when `limit` streams are open."""
        with self.lock:
            if self.open >= limit:
                return None
            self.open += 1
        released = threading.Event()

        def release() -> None:
            with self.lock:
                if not released.is_set():
                    released.set()
                    self.open -= 1

        return release


slots = _Slots()


def _frame(event: str, data: dict[str, Any], cursor: str) -> str:
    return f"id: {cursor}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def client_gone(sock: Any) -> bool:
    """Whether the client closed its end of `sock` (gunicorn hands views the socket): a
    stream whose client left ends at its next poll, not at its next write (up to
    KEEPALIVE_SECONDS later), and frees its thread. Unknown (no socket, TLS): False."""
    if sock is None or isinstance(sock, ssl.SSLSocket):
        return False
    try:
        waiting, _, _ = io_select.select([sock], [], [], 0)
        return bool(waiting) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed
        return True


def frames(stream: EventStream, *, poll: float, max_seconds: float, token: str | None,
           gone: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """The stream's text: its events as they come, a keepalive when quiet, an `end` event
    when a bound is reached; nothing more once `gone()` says the client left. The catalog
    session is closed before anything is written."""
    clock = time.monotonic
    started = clock()
    deadline = started + max_seconds
    last_write = last_auth = started
    yield f"retry: {RETRY_MS}\n\n"
    while True:
        try:
            with transaction() as session:
                events, more = stream.poll(session)
        except Exception:  # the database is away: the client reconnects with its last id
            log.warning("event stream: reading the catalog failed; closing the stream", exc_info=True)
            return
        now = clock()
        if events:
            yield "".join(_frame(*e) for e in events)
            last_write = now
        reason = ("job_done" if stream.done else "max_seconds" if now >= deadline else None)
        if reason is None and now - last_auth >= REAUTH_SECONDS:
            last_auth = now
            try:
                access.principal_of(token)  # the check every request passes (api.access)
            except Unauthenticated:
                reason = "unauthenticated"
            except Exception:  # the check could not be made: the client reconnects and is checked then
                log.warning("event stream: could not check the credentials again; closing the stream", exc_info=True)
                return
        if reason is not None:
            yield _frame("end", StreamEnd(reason=reason).model_dump(mode="json"), stream.cursor.encode())
            return
        if now - last_write >= KEEPALIVE_SECONDS:
            # An id without data moves the client's Last-Event-ID on without an event.
            yield f": keepalive\nid: {stream.cursor.encode()}\n\n"
            last_write = now
        if gone():
            return
        if not more:
            time.sleep(max(0.0, min(poll, deadline - now)))


@operation(bp, "", "GET", summary="Live events: job progress, replica state changes, alerts (server-sent events)",
           query=EventStreamQuery, responses={200: None, 404: None, 503: None}, stream=EVENT_MODELS,
           headers={"Last-Event-ID": "resume after this event id (what EventSource sends when it reconnects)"})
def stream(query: EventStreamQuery):
    principal = current()
    require_backends(principal, "read", query.backend)
    types = effective_types(query)
    if not types:
        raise InvalidRequest("nothing to send: alerts and replicas name no job, replicas no policy", field="types")
    if query.until == "job_done" and not query.job:
        raise InvalidRequest("until=job_done needs the jobs to wait for (job=ID)", field="until")
    if query.until == "job_done" and "job" not in types:
        raise InvalidRequest("until=job_done ends on job events: types must include job", field="types")
    if query.cursor is not None and query.since is not None:
        raise InvalidRequest("give cursor or since, not both", field="since")
    header = request.headers.get("Last-Event-ID")
    resume = (Cursor.decode(header, "Last-Event-ID") if header
              else Cursor.decode(query.cursor, "cursor") if query.cursor else None)
    allowed = readable(principal)
    filters = Filters(jobs=tuple(dict.fromkeys(query.job)), policies=frozenset(query.policy),
                      backends=frozenset(query.backend), types=types,
                      readable=None if allowed is None else frozenset(allowed), until_done=query.until == "job_done")
    with transaction() as session:
        for job_id in filters.jobs:
            job = catalog.get_job(session, job_id)  # 404 before anything streams
            require_backends(principal, "read", sorted(job_about(session, job)[0]))
        events = EventStream(filters, resume) if resume else EventStream.starting(session, filters,
                                                                                   query.since or utcnow())
    settings = get_settings()
    release = slots.take(settings.events_max_streams)
    if release is None:
        busy = TooManyStreams(f"this API process already serves {settings.events_max_streams} event streams "
                              f"(FERRY_EVENTS_MAX_STREAMS); retry in {BUSY_RETRY_AFTER} s",
                              details={"retry_after": BUSY_RETRY_AFTER})
        return jsonify({"error": busy.to_dict()}), 503, {"Retry-After": str(BUSY_RETRY_AFTER)}
    sock = request.environ.get("gunicorn.socket")
    body = frames(events, poll=settings.events_poll_seconds, max_seconds=query.max_seconds, token=access.bearer(),
                  gone=lambda: client_gone(sock))
    response = Response(body, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(release)  # run by the server when the stream ends or the client goes
    return response
