"""OpenAPI from the same pydantic models that validate requests: one source of truth.

Views are registered with `operation(...)`, which records the path, method, body and
query models and the responses; `spec()` renders them as an OpenAPI 3.1 document.
The wrapper parses and validates the body and query before the view runs.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

from flask import Blueprint, g, request
from pydantic import BaseModel, ValidationError

from ferry import __version__
from ferry.errors import InvalidRequest, NotFound
from ferry.security import check


class MalformedBody(InvalidRequest):
    """Raised when a request body is not a JSON object."""

    code = "malformed_json"
    status = 400


class PathNotFound(NotFound):
    """Raised for a path parameter nothing can be named by."""


@dataclass
class Operation:
    path: str
    method: str
    summary: str
    tag: str
    responses: dict[int, type[BaseModel] | None]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    path_params: list[str] = field(default_factory=list)
    permission: str = "read"  # read | operate | admin | public (see ferry.security)
    endpoint: str = ""
    # A streamed answer (server-sent events): the `data:` models by event name.
    stream: dict[str, type[BaseModel]] | None = None
    headers: dict[str, str] = field(default_factory=dict)  # request headers read, and what for


OPERATIONS: list[Operation] = []
_RULE_PARAM = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")


def operation(bp: Blueprint, rule: str, method: str, *, summary: str, responses: dict,
              body: type[BaseModel] | None = None, query: type[BaseModel] | None = None,
              permission: str | None = None, stream: dict[str, type[BaseModel]] | None = None,
              headers: dict[str, str] | None = None) -> Callable:
    """Register a view. `permission` defaults to `read` for GET and `operate` otherwise;
    `public` (health checks only) needs no credentials. It is checked here, before the body
    is even parsed, for every operation: the one place the API authorizes.

    A list field of the `query` model takes every value of a repeated parameter. `stream`
    documents a 200 answer of server-sent events (their `data:` models by event name);
    `headers` the request headers the view reads."""
    path = (bp.url_prefix or "") + rule
    permission = permission or ("read" if method == "GET" else "operate")
    assert permission in ("public", "read", "operate", "admin"), permission
    op = Operation(_RULE_PARAM.sub(r"{\1}", path), method.lower(), summary, bp.name, responses, body,
                   query, _RULE_PARAM.findall(path), permission, stream=stream, headers=dict(headers or {}))
    OPERATIONS.append(op)

    def decorate(fn: Callable) -> Callable:
        op.endpoint = f"{bp.name}.{fn.__name__}"

        @wraps(fn)
        def view(**kwargs: Any) -> Any:
            if permission != "public":
                check(g.principal, permission)
            for name in op.path_params:  # no job, object, policy or key has a NUL in its name
                if "\x00" in str(kwargs.get(name, "")):
                    raise PathNotFound(f"no {name} contains a NUL character", field=name)
            if body is not None:
                kwargs["body"] = validated(body, _json_body())
            if query is not None:
                kwargs["query"] = validated(query, _query_args(query))
            return fn(**kwargs)

        bp.add_url_rule(rule, view_func=view, methods=[method])
        return view

    return decorate


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is list


def _query_args(model: type[BaseModel]) -> dict[str, Any]:
    """The query string: a parameter's first value, or all of them for a list field."""
    fields = model.model_fields
    return {name: request.args.getlist(name) if name in fields and _is_list(fields[name].annotation)
            else request.args[name] for name in request.args}


def _json_body() -> Any:
    raw = request.get_data(cache=False)
    if not raw:
        raise MalformedBody("the request needs a JSON body")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedBody("the body must be a JSON object")
    return data


def validated(model: type[BaseModel], data: Any) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [{"field": ".".join(str(p) for p in e["loc"]) or None, "reason": e["msg"]}
                    for e in exc.errors(include_url=False)]
        first = problems[0]
        raise InvalidRequest(f"{first['field']}: {first['reason']}" if first["field"] else first["reason"],
                             field=first["field"], details=problems) from None


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        components[name] = sub
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event_schema(models: dict[str, type[BaseModel]], components: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event (before OpenAPI 3.2's itemSchema, a stream's `schema` is that
    of each event): its `event` name, its `data` the JSON of that event's model."""
    return {
        "type": "object", "required": ["event", "data"],
        "description": "a server-sent event: `event` names it, `data` is its JSON, `id` the cursor to resume after it",
        "properties": {"event": {"enum": list(models)}, "data": {"type": "string"}, "id": {"type": "string"},
                       "retry": {"type": "integer"}},
        "oneOf": [{"properties": {"event": {"const": name}, "data": {
            "contentMediaType": "application/json", "contentSchema": _schema(model, components)}}}
            for name, model in models.items()],
    }


def spec(error_model: type[BaseModel]) -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    error_ref = _schema(error_model, components)
    for op in OPERATIONS:
        entry: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                                 "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_')}"
                                 .replace("{", "").replace("}", "").replace(".", "_"),
                                 "responses": {}}
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in op.path_params]
        if op.query is not None:
            qschema = op.query.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(qschema.pop("$defs", {}))
            for name, prop in qschema.get("properties", {}).items():
                params.append({"name": name, "in": "query", "required": name in qschema.get("required", []),
                               "schema": prop})
        params += [{"name": name, "in": "header", "required": False, "description": what,
                    "schema": {"type": "string", "maxLength": 4096}} for name, what in op.headers.items()]
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": _schema(op.body, components)}}}
        for status, model in op.responses.items():
            schema = _schema(model, components) if model else error_ref if status >= 400 else None
            content = {"application/json": {"schema": schema}} if schema else None
            if op.stream is not None and status == 200:
                content = {"text/event-stream": {"schema": _event_schema(op.stream, components)}}
            entry["responses"][str(status)] = {"description": _REASONS.get(status, "response"),
                                               **({"content": content} if content else {})}
        errors = ([400, 413, 422] if op.body else []) + ([422] if op.query else [])
        errors += [404] if op.path_params else []
        if op.permission != "public":
            entry["security"] = [{"apiKey": []}]
            entry["x-ferry-permission"] = op.permission
            errors += [401, 403, 429]
        for status in errors:
            entry["responses"].setdefault(str(status), {
                "description": _REASONS[status], "content": {"application/json": {"schema": error_ref}}})
        # Answered by the HTTP server (gunicorn) before the API sees the request: malformed
        # HTTP (a broken header: 400) and a request line over 8190 bytes (414). Their body is
        # the server's short HTML page, not the JSON shape.
        html = {"text/html": {"schema": {"type": "string"}}}
        entry["responses"]["414"] = {"description": _REASONS[414], "content": html}
        # Any request can be malformed HTTP: 400 is JSON from the API, HTML from the server.
        entry["responses"]["400"] = {"description": _REASONS[400], "content": {
            "application/json": {"schema": error_ref}, **html}}
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "Ferry control API", "version": __version__,
                 "description": "Bulk jobs that keep content-addressed objects where policy says."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"apiKey": {
            "type": "http", "scheme": "bearer",
            "description": "An API key (fy_...) or, where an OIDC issuer is configured, its access token"}}},
    }


_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 400: "Malformed request", 401: "Missing or bad credentials",
            403: "A permission is missing", 404: "Not found", 414: "Request line too long (over 8190 bytes)",
            429: "Rate limit exceeded",
            409: "Conflict with the current state", 413: "Request body too large",
            422: "Invalid request", 500: "Internal error", 503: "Not ready"}
