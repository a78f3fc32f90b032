"""The Flask control API: `create_app()` is its factory, one blueprint per resource."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from api import openapi
from api.schemas import ErrorBody
from ferry import logs
from ferry.errors import FerryError
from ferry.security import RateLimited, Unauthenticated, check

log = logging.getLogger(__name__)

# 100 000 keys of ~100 characters fit with room to spare.
MAX_BODY_BYTES = 32 * 2**20


access_log = logging.getLogger("ferry.api.access")
# Probes and scrapes: logged at DEBUG unless they fail, or they drown the rest.
QUIET_ENDPOINTS = frozenset({"health.healthz", "health.readyz", "metrics.metrics"})


def _request_log(app: Flask) -> None:
    """One line per request (method, path, status, time, caller) under a request id the
    response returns as X-Request-ID; every line logged while serving it carries the id."""

    @app.before_request
    def start() -> None:
        given = request.headers.get("X-Request-ID", "")
        rid = given if given and len(given) <= 64 and given.isprintable() else uuid.uuid4().hex[:16]
        g.request_started, g.request_id = time.perf_counter(), rid
        g.log_token = logs.bind(request_id=rid, cid=(request.view_args or {}).get("cid"),
                                job=(request.view_args or {}).get("job_id"))

    @app.after_request
    def line(response):
        principal = g.get("principal")
        notes = g.get("audit", {})
        level = logging.DEBUG if request.endpoint in QUIET_ENDPOINTS and response.status_code < 400 else logging.INFO
        access_log.log(level, "%s %s %d", request.method, request.full_path.rstrip("?"), response.status_code,
                       extra={"status": response.status_code, "client": request.remote_addr,
                              "ms": round((time.perf_counter() - g.get("request_started", time.perf_counter()))
                                          * 1000, 2),
                              "actor": principal.id if principal else None,
                              "job": notes.get("job_id") or (request.view_args or {}).get("job_id"),
                              "cid": notes.get("cid") or (request.view_args or {}).get("cid")})
        if g.get("request_id"):
            response.headers["X-Request-ID"] = g.request_id
        return response

    @app.teardown_request
    def end(_exc) -> None:
        token = g.pop("log_token", None)
        if token is not None:
            try:
                logs.unbind(token)
            except ValueError:
                pass


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    from api import access, backends, deals, events, health, jobs, metrics, objects, policies, search
    from ferry.catalog.db import transaction
    from ferry.catalog.replicas import sync_backends
    from ferry.settings import get_settings

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, JSON_SORT_KEYS=False)
    if test_config:
        app.config.update(test_config)
    app.json.sort_keys = False

    _request_log(app)  # first, so its clock and request id cover authentication too
    for bp in (jobs.bp, objects.bp, backends.bp, policies.bp, policies.events_bp, health.bp, metrics.bp, deals.bp,
               deals.providers_bp, deals.pieces_bp, deals.schedules_bp, search.bp, events.bp):
        app.register_blueprint(bp)
    access.install(app)

    @app.before_request
    def negotiate_events():
        # GET /v1/events is the list of alerts as JSON, or, to a client that asks for
        # server-sent events (EventSource sends Accept: text/event-stream), the live stream
        # that /v1/events/stream also serves. After authentication: the stream checks its own
        # permission and parameters.
        if request.method == "GET" and request.path == "/v1/events" and \
                request.accept_mimetypes.best_match(["application/json", "text/event-stream"]) == "text/event-stream":
            return app.view_functions["event_stream.stream"]()
        return None

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
