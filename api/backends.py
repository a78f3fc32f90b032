"""/v1/backends: the configured backends (secrets only as references), and a check of a
candidate backend before it goes into the backends file."""

from __future__ import annotations

import time

from flask import Blueprint, jsonify
from pydantic import ValidationError

from api.access import note
from api.openapi import operation
from api.schemas import BackendCheck, BackendCheckOut, BackendList, BackendOut
from ferry.errors import BackendError, ConfigError, InvalidRequest
from ferry.security import check_endpoint, urls_in
from ferry.settings import BackendSpec, get_settings
from tasks.app import queue_for
from workers import registry

bp = Blueprint("backends", __name__, url_prefix="/v1/backends")


@operation(bp, "", "GET", summary="Configured backends", responses={200: BackendList})
def index():
    out = [BackendOut(name=b.name, driver=b.driver, labels=b.labels, settings=b.settings,
                      queue=queue_for(b.name)).model_dump(mode="json")
           for b in get_settings().backends().values()]
    return jsonify({"backends": out})


@operation(bp, "/check", "POST", summary="Connect to a candidate backend (endpoints must be allow-listed) "
           "and report whether it answers, with its capacity", body=BackendCheck,
           responses={200: BackendCheckOut}, permission="admin")
def check(body: BackendCheck):
    """Backends are configured in the backends file; this tests one before it goes there.
    Every URL in its settings is checked against FERRY_ENDPOINT_ALLOWLIST first, so the API
    cannot be made to connect to a metadata service or an arbitrary host."""
    note(backends=[body.name], detail=f"check of a {body.driver} backend")
    if body.driver == "local":
        raise InvalidRequest("a local root is a path on the server: configure it in the backends file",
                             field="driver")
    try:
        spec = BackendSpec(name=body.name, driver=body.driver, labels=body.labels, settings=body.settings)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid backend: {exc.errors(include_url=False)[0]['msg']}", field="settings") from None
    allowlist = get_settings().endpoint_allowlist
    for path, url in urls_in(spec.settings):
        check_endpoint(url, allowlist, field=path)
    try:
        backend = registry.build(spec)
    except ConfigError as exc:
        raise InvalidRequest(exc.message, field="settings") from None
    started = time.monotonic()
    try:
        backend.check()
        capacity = backend.capacity()
        ok, error = True, None
    except BackendError as exc:
        ok, error, capacity = False, exc.message, None
    out = BackendCheckOut(name=spec.name, driver=spec.driver, ok=ok, error=error, seconds=time.monotonic() - started,
                          capacity={"used": capacity.used, "limit": capacity.limit} if capacity else None)
    return jsonify(out.model_dump(mode="json"))
