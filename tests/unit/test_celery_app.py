"""The Celery app's delivery guarantees and routing, checked against the session's Redis."""

from __future__ import annotations

import base64
import json
import uuid

import redis

from ferry.catalog.jobs import Batch
from ferry.settings import get_settings
from tasks.app import app, send_batches


def test_delivery_settings():
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
    assert conf.task_ignore_result and conf.result_backend is None  # state lives in the catalog
    queues = {q.name: q for q in conf.task_queues}
    # (Queues are declared from the backends file as it was when tasks.app was imported.)
    assert {"ferry.control", "backend.local", "backend.archive"} <= set(queues)
    # Each queue is reachable by its own routing key only, so a message reaches one queue.
    assert all(q.routing_key == name and q.exchange.name == name for name, q in queues.items())


def test_a_batch_goes_to_its_destination_queue_only():
    r = redis.Redis.from_url(get_settings().broker)
    before = {q: r.llen(q) for q in ("backend.archive", "backend.local", "backend.s3", "ferry.control")}
    job_id = uuid.uuid4()
    assert send_batches([Batch(job_id, "archive", [(0, 5), (9, 10)])]) == 1
    after = {q: r.llen(q) for q in before}
    assert after["backend.archive"] == before["backend.archive"] + 1
    assert {q: after[q] - before[q] for q in before if q != "backend.archive"} == {
        "backend.local": 0, "backend.s3": 0, "ferry.control": 0}
    message = json.loads(r.lindex("backend.archive", 0))
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert message["headers"]["task"] == "ferry.transfer"
    assert args == [str(job_id), [[0, 5], [9, 10]]]
    r.lpop("backend.archive")
