"""Logging for every Ferry process: one JSON object a line for log shippers, or readable
text in a terminal, and on every line the ids of what it is about.

- FERRY_LOG_FORMAT: `auto` (text when stderr is a terminal, else JSON), `json` or `text`;
  FERRY_LOG_LEVEL (INFO).
- Every line carries `job`, `item`, `cid` and `backend` (null when the line is about none):
  code sets them for a stretch of work with `context(job=..., ...)`, a contextvar, so each
  thread and each Celery task has its own.
- The API (gunicorn, including its own error and access loggers), the Celery workers and
  beat all log through `dict_config()`; the CLI's own output is not logging.
"""

from __future__ import annotations

import contextvars
import logging
import logging.config
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter

FIELDS = ("job", "item", "cid", "backend")
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("ferry_log_context", default=None)


@contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Add these ids (job, item, cid, backend, or any other) to every line logged inside."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def bind(**fields: Any) -> contextvars.Token:
    """As `context`, for code that cannot wrap a block (Flask's before/teardown hooks)."""
    return _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}})


def unbind(token: contextvars.Token) -> None:
    _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the context's ids on the record (a record's own `extra` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get() or {}
        for key in FIELDS:
            if not hasattr(record, key):
                setattr(record, key, ctx.get(key))
        for key, value in ctx.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class _Json(JsonFormatter):
    def __init__(self) -> None:
        super().__init__(["levelname", "name", "message"], rename_fields={"levelname": "level", "name": "logger"})

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        super().add_fields(log_data, record, message_dict)
        for key in FIELDS:
            log_data.setdefault(key, getattr(record, key, None))
        log_data["process"] = record.process


class _Text(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if getattr(record, k, None) is not None)
        return f"{line} [{ids}]" if ids else line


class Formatter(logging.Formatter):
    """JSON or text, as FERRY_LOG_FORMAT says (`auto`: text on a terminal)."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        super().__init__()
        from ferry.settings import get_settings

        fmt = get_settings().log_format
        if fmt == "auto":
            fmt = "text" if sys.stderr.isatty() else "json"
        self.inner: logging.Formatter = _Json() if fmt == "json" else _Text()

    def format(self, record: logging.LogRecord) -> str:
        return self.inner.format(record)


def dict_config(level: str | int | None = None) -> dict[str, Any]:
    """The logging configuration of every Ferry process (gunicorn takes it as `logconfig_dict`)."""
    from ferry.settings import get_settings

    level = logging.getLevelName(level) if isinstance(level, int) else (level or get_settings().log_level)
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "ferry",
               "filters": ["context"]}
    quiet = {"level": "WARNING"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ferry": {"()": "ferry.logs.Formatter"}},
        "filters": {"context": {"()": "ferry.logs.ContextFilter"}},
        "handlers": {"stderr": handler},
        "root": {"level": str(level).upper(), "handlers": ["stderr"]},
        "loggers": {
            # gunicorn's own loggers keep their levels but write through ours.
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "botocore": quiet, "urllib3": quiet, "httpx": quiet, "httpcore": quiet, "filelock": quiet,
            "sentence_transformers": quiet, "huggingface_hub": quiet, "faiss": quiet,
        },
    }


def configure(level: str | int | None = None) -> None:
    logging.config.dictConfig(dict_config(level))
