"""/v1/backends: the configured backends (secrets only as references)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.openapi import operation
from api.schemas import BackendList, BackendOut
from ferry.settings import get_settings
from tasks.app import queue_for

bp = Blueprint("backends", __name__, url_prefix="/v1/backends")


@operation(bp, "", "GET", summary="Configured backends", responses={200: BackendList})
def index():
    out = [BackendOut(name=b.name, driver=b.driver, labels=b.labels, settings=b.settings,
                      queue=queue_for(b.name)).model_dump(mode="json")
           for b in get_settings().backends().values()]
    return jsonify({"backends": out})
