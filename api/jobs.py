"""/v1/jobs: submit bulk jobs, follow their progress, list their items, cancel them."""

from __future__ import annotations

from flask import Blueprint, jsonify, url_for
from sqlalchemy import select

from api.access import current, note
from api.openapi import operation
from api.schemas import (
    ItemOut,
    ItemPage,
    ItemQuery,
    JobAccepted,
    JobCreate,
    JobList,
    JobListQuery,
    JobOut,
    VerifyReport,
)
from ferry.catalog import jobs as catalog
from ferry.catalog.db import transaction
from ferry.catalog.models import Job, JobKind
from ferry.catalog.replicas import verify_report
from ferry.errors import InvalidRequest
from ferry.security import require_backends
from tasks import jobs as job_tasks

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")


def job_out(job: Job, counts: dict) -> dict:
    spec = job.spec
    return JobOut(
        id=job.id, kind=job.kind, state=job.state, source=spec.get("source", {}), targets=spec.get("targets", []),
        keep_source=spec.get("keep_source", False), total=job.total, error=job.error,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at, **counts,
    ).model_dump(mode="json")


def authorize_job(kind: str, source: str, targets: list[str], keep_source: bool) -> None:
    """A job reads its source and writes its targets; a migrate also deletes at its source."""
    note(backends=[source, *targets])
    principal = current()
    moves = kind == "migrate" and not keep_source
    require_backends(principal, "write" if moves else "read", [source])
    require_backends(principal, "write", targets)


@operation(bp, "", "POST", summary="Submit a migrate, replicate, verify, deal or index job", body=JobCreate,
           responses={202: JobAccepted})
def create(body: JobCreate):
    source = body.source.model_dump(exclude_none=True)
    if body.source.keys is not None:
        source["keys"] = len(body.source.keys)  # the items hold the keys; the spec keeps a count
    spec = {"source": source, "targets": [t.model_dump() for t in body.targets],
            "keep_source": body.keep_source}
    if body.sample is not None:
        spec["sample"] = body.sample
    if body.deal is not None:
        if body.kind != "deal":
            raise InvalidRequest("deal terms apply to deal jobs only", field="deal")
        spec["deal"] = body.deal.model_dump(exclude_none=True)
    if body.tags:
        if body.kind in ("verify", "deal", "index"):
            raise InvalidRequest("tags apply to the objects a migrate or replicate job copies", field="tags")
        spec["tags"] = sorted(set(body.tags))
    authorize_job(body.kind, body.source.backend, [t.backend for t in body.targets], body.keep_source)
    request = job_tasks.JobRequest(
        kind=JobKind(body.kind), source_backend=body.source.backend, keys=body.source.keys,
        prefix=body.source.prefix, keep_source=body.keep_source, spec=spec, sample=body.sample,
        targets=[job_tasks.Target(t.backend, t.prefix) for t in body.targets])
    job = job_tasks.submit(request)
    note(job_id=str(job.id))
    url = url_for("jobs.get", job_id=job.id)
    accepted = JobAccepted(id=job.id, state=job.state, url=url)
    return jsonify(accepted.model_dump(mode="json")), 202, {"Location": url}


@operation(bp, "", "GET", summary="List recent jobs", query=JobListQuery, responses={200: JobList})
def index(query: JobListQuery):
    with transaction() as session:
        q = select(Job).order_by(Job.created_at.desc()).limit(query.limit)
        if query.state is not None:
            q = q.where(Job.state == query.state)
        jobs = list(session.scalars(q))
        counts = catalog.counts_of(session, [j.id for j in jobs])
        return jsonify({"jobs": [job_out(j, counts[j.id]) for j in jobs]})


@operation(bp, "/<job_id>", "GET", summary="A job's state and progress counts", responses={200: JobOut})
def get(job_id: str):
    with transaction() as session:
        job = catalog.get_job(session, job_id)
        return jsonify(job_out(job, catalog.counts(session, job.id)))


@operation(bp, "/<job_id>/items", "GET", summary="A job's items, filtered by state, paged by seq",
           query=ItemQuery, responses={200: ItemPage})
def items(job_id: str, query: ItemQuery):
    with transaction() as session:
        job = catalog.get_job(session, job_id)
        rows = catalog.list_items(session, job.id, state=query.state, after=query.after, limit=query.limit)
        page = ItemPage(
            items=[ItemOut.model_validate(r, from_attributes=True) for r in rows],
            next_after=rows[-1].seq if len(rows) == query.limit else None,
        )
        return jsonify(page.model_dump(mode="json"))


@operation(bp, "/<job_id>/cancel", "POST", summary="Cancel a job that has not ended",
           responses={200: JobOut, 409: None})
def cancel(job_id: str):
    with transaction() as session:
        job = catalog.get_job(session, job_id)
        spec = job.spec or {}
        if job.source_backend is not None:  # a policy's reconcile job has no single source
            authorize_job(job.kind.value, job.source_backend, [t["backend"] for t in spec.get("targets", [])],
                          spec.get("keep_source", False))
        job = catalog.cancel_job(session, job_id)
        session.flush()
        return jsonify(job_out(job, catalog.counts(session, job.id)))


@operation(bp, "/<job_id>/report", "GET", summary="A verify job's findings: checked, bad, missing, healing",
           responses={200: VerifyReport})
def report(job_id: str):
    with transaction() as session:
        job = catalog.get_job(session, job_id)
        return jsonify(VerifyReport(**verify_report(session, job.id)).model_dump(mode="json"))
