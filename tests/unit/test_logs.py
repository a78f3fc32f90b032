"""ferry/logs.py: every line carries job, item, cid and backend (null when unknown), from the
context of the work it is about; JSON for shippers, text on a terminal."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from ferry import logs
from ferry.settings import get_settings


@pytest.fixture
def captured(monkeypatch):
    def make(fmt: str) -> tuple[logging.Logger, io.StringIO]:
        monkeypatch.setattr(get_settings(), "log_format", fmt)
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(logs.Formatter())
        handler.addFilter(logs.ContextFilter())
        logger = logging.getLogger(f"ferry.test.{fmt}")
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
        return logger, out

    return make


def test_json_lines_carry_the_ids_of_the_work_and_null_outside_it(captured):
    log, out = captured("json")
    log.info("outside")
    with logs.context(job="j-1", backend="s3"):
        with logs.context(item=7, cid="bafy1"):
            log.warning("copying %s", "a/b", extra={"status": 3})
        log.info("after the item")
    first, inner, after = (json.loads(line) for line in out.getvalue().splitlines())
    assert {k: first[k] for k in logs.FIELDS} == dict.fromkeys(logs.FIELDS)
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "ferry.test.json", "outside")
    assert {k: inner[k] for k in logs.FIELDS} == {"job": "j-1", "item": 7, "cid": "bafy1", "backend": "s3"}
    assert inner["message"] == "copying a/b" and inner["status"] == 3 and inner["time"].endswith("+00:00")
    assert (after["job"], after["item"]) == ("j-1", None)  # the inner context ended with its block


def test_each_thread_has_its_own_context(captured):
    log, out = captured("json")

    def work(n: int) -> None:
        with logs.context(item=n):
            log.info("item")

    with logs.context(job="parent"):
        threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted(x["item"] for x in lines) == [0, 1, 2]
    assert {x["job"] for x in lines} == {None}  # a new thread starts with an empty context


def test_text_for_a_terminal_names_the_ids_it_has(captured, monkeypatch):
    log, out = captured("text")
    with logs.context(job="j-2", cid="bafy2"):
        log.info("hello")
    log.info("plain")
    hello, plain = out.getvalue().splitlines()
    assert hello.endswith("INFO    ferry.test.text: hello [job=j-2 cid=bafy2]")
    assert plain.endswith("ferry.test.text: plain")
    monkeypatch.setattr(get_settings(), "log_format", "auto")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert isinstance(logs.Formatter().inner, logs._Text)


def test_the_dict_config_is_what_gunicorn_and_celery_get():
    config = logs.dict_config("warning")
    assert config["root"]["level"] == "WARNING"
    assert config["loggers"]["gunicorn.error"]["handlers"] == ["stderr"]
    # The factories it names exist (dictConfig itself would replace pytest's own handlers).
    assert config["formatters"]["ferry"]["()"] == "ferry.logs.Formatter" and logs.Formatter()
    assert config["filters"]["context"]["()"] == "ferry.logs.ContextFilter" and logs.ContextFilter()
