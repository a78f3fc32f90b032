"""/v1/objects: an object by CID with its replicas; its content, streamed from the best
verified replica and checked while it streams (a read is an access, for age-based
transitions); its legal hold and labels; its deletion from every backend; the text
extracted from it for search."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify, stream_with_context, url_for
from sqlalchemy import update

from api.access import current, note
from api.openapi import operation
from api.schemas import HoldUpdate, JobAccepted, ObjectLabels, ObjectOut, ObjectText, ReplicaOut
from ferry.catalog.db import transaction
from ferry.catalog.models import CheckResult, ReplicaState, SearchDocument, StoredObject, utcnow
from ferry.catalog.replicas import Check, get_object, label_objects, record_checks
from ferry.errors import BackendError, NotFound
from ferry.security import Forbidden, require_backends
from ferry.settings import get_settings
from tasks import jobs as job_tasks
from workers import registry, transfer

log = logging.getLogger(__name__)
bp = Blueprint("objects", __name__, url_prefix="/v1/objects")


def object_out(obj: StoredObject) -> dict:
    return ObjectOut(cid=obj.cid, sha256=obj.sha256, size=obj.size, media_type=obj.media_type,
                     tags=list(obj.tags or []), metadata=dict(obj.meta or {}),
                     created_at=obj.created_at, last_accessed_at=obj.last_accessed_at,
                     legal_hold=obj.legal_hold, lost_at=obj.lost_at,
                     replicas=[ReplicaOut.model_validate(r, from_attributes=True) for r in obj.replicas]
                     ).model_dump(mode="json")


@operation(bp, "/<cid>", "GET", summary="An object and its replicas", responses={200: ObjectOut})
def get(cid: str):
    with transaction() as session:
        return jsonify(object_out(get_object(session, cid)))


class NoVerifiedReplica(NotFound):
    """Raised when an object has no verified replica on a configured backend to read from."""

    code = "no_verified_replica"


@operation(bp, "/<cid>/content", "GET", summary="The object's bytes, from its best verified replica, "
           "checked against its sha256 as they stream", responses={200: None, 404: None})
def content(cid: str):
    backends = get_settings().backends()
    principal = current()
    with transaction() as session:
        obj = get_object(session, cid)
        good = sorted((r for r in obj.replicas if r.state == ReplicaState.present and r.backend in backends),
                      key=lambda r: (r.verified_at is None, -(r.verified_at.timestamp() if r.verified_at else 0)))
        if not good:
            raise NoVerifiedReplica(f"object {cid} has no verified replica to read from")
        # Only from backends the caller may read; which others hold it is not the caller's business.
        good = [r for r in good if principal.may(r.backend, "read")]
        if not good:
            holders = ",".join(sorted({r.backend for r in obj.replicas if r.state == ReplicaState.present}))
            raise Forbidden(f"permission read:{holders} is needed: read is granted on no backend holding object {cid}",
                            details={"missing": f"read:{holders}"})
        obj.last_accessed_at = utcnow()
        sha, size, media_type = obj.sha256, obj.size, obj.media_type
        sources = [(r.backend, r.key) for r in good]
    # Try replicas in order until one opens; a replica that turns out corrupt is marked bad.
    last_error: BackendError | None = None
    for backend_name, key in sources:
        backend = registry.get(backends[backend_name])

        def mark_bad(reason: str, backend_name: str = backend_name, key: str = key) -> None:
            log.error("object %s: replica %s:%s is corrupt (%s); marked bad", cid, backend_name, key, reason)
            with transaction() as s:
                record_checks(s, [Check(backend_name, key, CheckResult.bad, size, 0.0, reason)])

        try:
            chunks = transfer.verified_stream(backend, key, sha, size, mark_bad)
            first = next(chunks, b"")  # opens the object: a missing or unreachable replica fails here
        except BackendError as exc:
            last_error = exc
            continue

        def body(first: bytes = first, chunks=chunks):
            yield first
            yield from chunks

        headers = {"Content-Length": str(size), "ETag": f'"{cid}"', "X-Ferry-Backend": backend_name}
        return Response(stream_with_context(body()), mimetype=media_type or "application/octet-stream",
                        headers=headers)
    assert last_error is not None
    raise last_error


@operation(bp, "/<cid>", "DELETE", summary="Delete the object from every backend (a delete job) and from search now",
           responses={202: JobAccepted, 409: None})
def delete(cid: str):
    principal = current()

    def authorize(holders: list[str]) -> None:
        note(backends=holders, cid=cid)
        require_backends(principal, "write", holders)

    job = job_tasks.delete_object(cid, authorize)
    note(job_id=str(job.id))
    url = url_for("jobs.get", job_id=job.id)
    accepted = JobAccepted(id=job.id, state=job.state, url=url)
    return jsonify(accepted.model_dump(mode="json")), 202, {"Location": url}


@operation(bp, "/<cid>/text", "GET", summary="The text extracted from the object for search, and how it was made",
           responses={200: ObjectText, 404: None})
def text(cid: str):
    with transaction() as session:
        obj = get_object(session, cid)
        # The text is content: readable where the bytes are (or were, if all are now broken).
        holders = sorted({r.backend for r in obj.replicas if r.state != ReplicaState.gone})
        principal = current()
        if holders and not any(principal.may(b, "read") for b in holders):
            raise Forbidden(f"permission read:{','.join(holders) or '*'} is needed: read is granted on no backend "
                            f"holding object {cid}", details={"missing": f"read:{','.join(holders) or '*'}"})
        doc = session.get(SearchDocument, obj.id)
        if doc is None:
            raise NotIndexed(f"object {cid} is not indexed: submit an index job, or apply a policy with "
                             "`index: true` in its selector")
        return jsonify(ObjectText(cid=cid, name=doc.name, title=doc.title, media_type=doc.media_type,
                                  metadata_only=doc.metadata_only, truncated=doc.truncated, reason=doc.reason,
                                  chunks=doc.chunks, model=doc.model, indexed_at=doc.indexed_at,
                                  source_backend=doc.source_backend, text=doc.body).model_dump(mode="json"))


class NotIndexed(NotFound):
    """Raised when an object has no entry in the search indexes."""

    code = "not_indexed"


@operation(bp, "/<cid>/hold", "PUT", summary="Set or release the object's legal hold (blocks retention)",
           body=HoldUpdate, responses={200: ObjectOut}, permission="admin")
def hold(cid: str, body: HoldUpdate):
    with transaction() as session:
        obj = get_object(session, cid)
        session.execute(update(StoredObject).where(StoredObject.id == obj.id).values(legal_hold=body.hold))
        session.refresh(obj)
        return jsonify(object_out(obj))


@operation(bp, "/<cid>", "PATCH", summary="Add or remove tags, set metadata and media type",
           body=ObjectLabels, responses={200: ObjectOut})
def label(cid: str, body: ObjectLabels):
    with transaction() as session:
        obj = get_object(session, cid)
        label_objects(session, [obj.id], tags=body.add_tags, remove_tags=body.remove_tags,
                      metadata=body.metadata, media_type=body.media_type)
        session.refresh(obj)
        return jsonify(object_out(obj))
