"""/v1/policies: apply, list, show and delete policies; run one now; plan (a dry run),
status and retry of its stuck work. /v1/events: what the reconcile loop raised."""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.access import current, note
from api.openapi import operation
from api.schemas import (
    EventList,
    EventOut,
    EventQuery,
    PolicyApply,
    PolicyList,
    PolicyOut,
    PolicyPlan,
    PolicyStatus,
    RetryOut,
)
from ferry.catalog import jobs as catalog
from ferry.catalog import policies as stored
from ferry.catalog.db import after_commit, transaction
from ferry.catalog.models import Policy as PolicyRow
from ferry.catalog.models import utcnow
from ferry.errors import InvalidPolicy, InvalidRequest
from ferry.security import check, require_backends
from ferry.settings import get_settings
from policies import planner
from policies.schema import Policy
from tasks.app import send_batches, send_reconcile

bp = Blueprint("policies", __name__, url_prefix="/v1/policies")
events_bp = Blueprint("events", __name__, url_prefix="/v1/events")


def policy_out(row: PolicyRow, *, changed: bool = False, versions: list | None = None) -> dict:
    out = PolicyOut(name=row.name, version=row.version, changed=changed, document=row.document,
                    created_at=row.created_at, updated_at=row.updated_at, next_run_at=row.next_run_at,
                    run_started_at=row.run_started_at, last_pass_at=row.last_pass_at,
                    converged_at=row.converged_at, versions=versions).model_dump(mode="json")
    if versions is None:  # only GET shows them; the other fields are required, null when unset
        del out["versions"]
    return out


def _queries(session, policy: Policy) -> tuple[planner.PolicyQueries, list[planner.PolicyQueries]]:
    """The policy's queries, and those of the other policies (whose wants protect replicas)."""
    labels, by_cid = planner.backends()
    dialect = session.get_bind().dialect.name
    now = utcnow()
    every = [planner.PolicyQueries(Policy.from_dict(r.document), labels, dialect, now, by_cid)
             for r in stored.active(session) if r.name != policy.name]
    return planner.PolicyQueries(policy, labels, dialect, now, by_cid), every


def _authorize(policy: Policy) -> None:
    """A policy writes (copies to, deletes from) every backend its placement and transitions
    can select, and every backend at all when it has retention; it reads its selector's."""
    labels, _ = planner.backends()
    written: set[str] = set()
    if policy.placement is not None:
        for expr in [policy.placement.backends] + [t.to for t in policy.transitions]:
            written.update(expr.select(labels))
    if policy.retention is not None:
        written.update(get_settings().backends())
    if policy.filecoin is not None:
        written.add(policy.filecoin.backend)
    read = [policy.selector.backend] if policy.selector.backend else []
    note(policy=policy.name, backends=sorted(written | set(read)))
    require_backends(current(), "read", read)
    require_backends(current(), "write", sorted(written))


def _authorize_stored(session, name: str) -> None:
    try:
        policy = Policy.from_dict(stored.get(session, name).document)
    except InvalidPolicy:  # a stored document that no longer validates: only an admin may act on it
        check(current(), "admin")
        return
    _authorize(policy)


@operation(bp, "", "POST", summary="Create or update a policy (a new version when the document changed)",
           body=PolicyApply, responses={200: PolicyOut, 201: PolicyOut, 400: None})
def apply(body: PolicyApply):
    if (body.yaml is None) == (body.document is None):
        raise InvalidRequest("give the policy as either `yaml` (text) or `document` (an object)", field="yaml")
    policy = Policy.from_yaml(body.yaml) if body.yaml is not None else Policy.from_dict(body.document)
    _check_backends(policy)
    _authorize(policy)
    with transaction() as session:
        now = utcnow()
        # An interval schedule runs at once, then every interval; a cron one waits for its time.
        first_run = now if policy.schedule.kind == "interval" else policy.schedule.next_run_after(now)
        row, changed = stored.apply(session, policy.name, policy.to_document(), next_run_at=first_run)
        if changed:
            after_commit(session, send_reconcile)
        return jsonify(policy_out(row, changed=changed)), 201 if changed else 200


def _check_backends(policy: Policy) -> None:
    """Names in the document must be configured backends (label expressions may match none yet)."""
    backends = get_settings().backends()
    if policy.selector.backend is not None and policy.selector.backend not in backends:
        raise InvalidPolicy(f"unknown backend {policy.selector.backend!r}; configured: {', '.join(sorted(backends))}",
                            field="selector.backend")
    if policy.filecoin is not None:
        spec = backends.get(policy.filecoin.backend)
        if spec is None or spec.driver != "filecoin":
            found = [n for n, s in sorted(backends.items()) if s.driver == "filecoin"]
            raise InvalidPolicy(f"{policy.filecoin.backend!r} is not a filecoin backend (filecoin backends: "
                                f"{', '.join(found) or 'none'})", field="filecoin.backend")


@operation(bp, "", "GET", summary="List policies", responses={200: PolicyList})
def index():
    with transaction() as session:
        return jsonify({"policies": [policy_out(r) for r in stored.active(session)]})


@operation(bp, "/<name>", "GET", summary="A policy, its current document and its versions",
           responses={200: PolicyOut})
def get(name: str):
    with transaction() as session:
        row = stored.get(session, name)
        versions = [{"version": v.version, "created_at": v.created_at.isoformat()}
                    for v in stored.versions(session, name)]
        return jsonify(policy_out(row, versions=versions))


@operation(bp, "/<name>", "DELETE", summary="Stop enforcing a policy (stored objects are not touched)",
           responses={200: PolicyOut})
def delete(name: str):
    with transaction() as session:
        _authorize_stored(session, name)
        return jsonify(policy_out(stored.delete(session, name)))


@operation(bp, "/<name>/run", "POST", summary="Start the policy's work now, whatever its schedule",
           responses={202: PolicyOut, 409: None})
def run(name: str):
    with transaction() as session:
        _authorize_stored(session, name)
        row = stored.start_run(session, name)
        after_commit(session, send_reconcile)
        return jsonify(policy_out(row)), 202


@operation(bp, "/<name>/plan", "GET", summary="Dry run: what the policy's next run would copy, move, "
           "delete and verify, by backend", responses={200: PolicyPlan})
def plan(name: str):
    with transaction() as session:
        row = stored.get(session, name)
        policy = Policy.from_dict(row.document)
        q, every = _queries(session, policy)
        out = planner.plan(session, q, every, get_settings().reconcile_batch_objects)
        active = policy.schedule.kind == "continuous" or row.run_started_at is not None
        body = PolicyPlan.model_validate({"name": name, "active": active, **out})
        return jsonify(body.model_dump(mode="json", by_alias=True))


@operation(bp, "/<name>/status", "GET", summary="Objects matched, converged, replicating, stuck, bad, lost",
           responses={200: PolicyStatus})
def status(name: str):
    with transaction() as session:
        row = stored.get(session, name)
        q, _ = _queries(session, Policy.from_dict(row.document))
        counts = planner.status(session, q)
        return jsonify(PolicyStatus(name=name, next_run_at=row.next_run_at, run_started_at=row.run_started_at,
                                    last_pass_at=row.last_pass_at, converged_at=row.converged_at,
                                    **counts).model_dump(mode="json"))


@operation(bp, "/<name>/retry", "POST", summary="Queue the policy's stuck work again, with fresh attempts",
           responses={200: RetryOut})
def retry(name: str):
    with transaction() as session:
        _authorize_stored(session, name)
        batches = catalog.retry_stuck(session, policy=name)
        after_commit(session, lambda: send_batches(batches))
        return jsonify({"requeued": sum(hi - lo for b in batches for lo, hi in b.spans)})


@operation(events_bp, "", "GET", summary="Events the reconcile loop raised (objects lost, ...); asked with "
           "Accept: text/event-stream, the live stream of GET /v1/events/stream instead",
           query=EventQuery, responses={200: EventList})
def events(query: EventQuery):
    with transaction() as session:
        rows = stored.events(session, kind=query.kind, cid=query.cid, after=query.after, limit=query.limit)
        return jsonify({"events": [EventOut.model_validate(e, from_attributes=True).model_dump(mode="json")
                                   for e in rows]})
