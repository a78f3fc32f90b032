"""/healthz (the process answers) and /readyz (the catalog and the broker answer)."""

from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import text

from api.openapi import operation
from api.schemas import Health
from ferry.catalog.db import engine
from tasks.app import app as celery_app

bp = Blueprint("health", __name__)


@operation(bp, "/healthz", "GET", summary="Liveness: the API process answers", responses={200: Health},
           permission="public")
def healthz():
    return jsonify({"status": "ok", "checks": {}})


@operation(bp, "/readyz", "GET", summary="Readiness: database and broker answer",
           responses={200: Health, 503: Health}, permission="public")
def readyz():
    checks: dict[str, str] = {}
    try:
        with engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"failed: {type(exc).__name__}: {exc}"
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            conn.default_channel  # opens a channel: a broker that accepts TCP but not AMQP/RESP fails here
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"failed: {type(exc).__name__}: {exc}"
    ready = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ready" if ready else "not ready", "checks": checks}), 200 if ready else 503
