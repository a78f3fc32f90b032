"""/v1/objects: an object by CID, with its replicas on every backend."""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.openapi import operation
from api.schemas import ObjectOut, ReplicaOut
from ferry.catalog.db import transaction
from ferry.catalog.replicas import get_object

bp = Blueprint("objects", __name__, url_prefix="/v1/objects")


@operation(bp, "/<cid>", "GET", summary="An object and its replicas", responses={200: ObjectOut})
def get(cid: str):
    with transaction() as session:
        obj = get_object(session, cid)
        out = ObjectOut(cid=obj.cid, sha256=obj.sha256, size=obj.size, media_type=obj.media_type,
                        created_at=obj.created_at,
                        replicas=[ReplicaOut.model_validate(r, from_attributes=True) for r in obj.replicas])
        return jsonify(out.model_dump(mode="json"))
