"""The Flask control API: `create_app()` is its factory, one blueprint per resource."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from api import openapi
from api.schemas import ErrorBody
from ferry.errors import FerryError
from ferry.security import RateLimited, Unauthenticated, check

log = logging.getLogger(__name__)

# 100 000 keys of ~100 characters fit with room to spare.
MAX_BODY_BYTES = 32 * 2**20


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    from api import access, backends, deals, health, jobs, metrics, objects, policies, search
    from ferry.catalog.db import transaction
    from ferry.catalog.replicas import sync_backends
    from ferry.settings import get_settings

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, JSON_SORT_KEYS=False)
    if test_config:
        app.config.update(test_config)
    app.json.sort_keys = False

    for bp in (jobs.bp, objects.bp, backends.bp, policies.bp, policies.events_bp, health.bp, metrics.bp, deals.bp,
               deals.providers_bp, deals.pieces_bp, deals.schedules_bp, search.bp):
        app.register_blueprint(bp)
    access.install(app)

    @app.get("/v1/openapi.json")
    def openapi_document():
        check(g.principal, "read")
        return jsonify(openapi.spec(ErrorBody))

    @app.errorhandler(FerryError)
    def ferry_error(exc: FerryError):
        response = jsonify({"error": exc.to_dict()})
        if isinstance(exc, Unauthenticated):
            response.headers["WWW-Authenticate"] = 'Bearer realm="ferry"'
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response, exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        return jsonify({"error": {"code": code, "message": exc.description or exc.name}}), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        # The details (SQL, parameters, paths) go to the log only, under an id the caller can quote.
        error_id = uuid.uuid4().hex[:12]
        log.exception("unhandled error %s in %s %s", error_id, request.method, request.path)
        return jsonify({"error": {"code": "internal_error",
                                  "message": f"internal error {error_id}: see the API's log"}}), 500

    with transaction() as session:
        sync_backends(session, get_settings().backends())
    return app
