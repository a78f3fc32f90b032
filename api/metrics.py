"""/metrics: Prometheus gauges read from the catalog (and the broker's queue lengths) at
scrape time, so every API replica reports the same truth whichever process did the work:
objects lost, replicas by state, jobs, deals, work in flight and stuck, queue depths, each
policy's last pass. The names are listed in docs/metrics.md; workers serve their own
counters (tasks/metrics.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select

from api.openapi import operation
from ferry.catalog.db import transaction
from ferry.catalog.models import (
    BROKEN_REPLICA_STATES,
    SEARCH_INDEX,
    Deal,
    ItemState,
    Job,
    JobItem,
    Policy,
    Replica,
    StoredObject,
    utcnow,
)
from ferry.settings import get_settings

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)


class CatalogCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        with transaction() as session:
            lost = session.scalar(select(func.count()).select_from(StoredObject)
                                  .where(StoredObject.lost_at.is_not(None)))
            replicas = session.execute(select(Replica.backend, Replica.state, func.count())
                                       .group_by(Replica.backend, Replica.state)).all()
            items = session.execute(
                select(JobItem.dest_backend, JobItem.state, func.count())
                .where(JobItem.state.in_([ItemState.queued, ItemState.running, ItemState.stuck]))
                .group_by(JobItem.dest_backend, JobItem.state)).all()
            passes = session.execute(select(Policy.name, Policy.last_pass_at, Policy.converged_at)
                                     .where(Policy.deleted_at.is_(None))).all()
            jobs = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()
            deals = session.execute(select(Deal.state, func.count()).group_by(Deal.state)).all()
            oldest = session.execute(select(JobItem.dest_backend, func.min(JobItem.enqueued_at))
                                     .where(JobItem.state == ItemState.queued)
                                     .group_by(JobItem.dest_backend)).all()
        now = utcnow()
        g = GaugeMetricFamily("ferry_objects_lost", "Objects with no verified replica left (alert on > 0)")
        g.add_metric([], lost or 0)
        yield g
        g = GaugeMetricFamily("ferry_replicas", "Replicas by backend and state", labels=["backend", "state"])
        for backend, state, n in replicas:
            g.add_metric([backend, str(getattr(state, "value", state))], n)
        yield g
        g = GaugeMetricFamily("ferry_verification_failures",
                              "Replicas whose latest check failed (bad or missing), by backend", labels=["backend"])
        failing: dict[str, int] = {}
        for backend, state, n in replicas:
            if state in BROKEN_REPLICA_STATES:
                failing[backend] = failing.get(backend, 0) + n
        for backend, n in sorted(failing.items()):
            g.add_metric([backend], n)
        yield g
        g = GaugeMetricFamily("ferry_jobs", "Jobs by kind and state", labels=["kind", "state"])
        for kind, state, n in jobs:
            g.add_metric([_v(kind), _v(state)], n)
        yield g
        g = GaugeMetricFamily("ferry_deals", "Filecoin storage deals by state", labels=["state"])
        for state, n in deals:
            g.add_metric([_v(state)], n)
        yield g
        g = GaugeMetricFamily("ferry_oldest_queued_item_age_seconds",
                              "Age of the oldest work item still queued, by destination backend", labels=["backend"])
        for backend, first in oldest:
            if first is not None:
                g.add_metric([backend], max(0.0, (now - first).total_seconds()))
        yield g
        yield from _queues()
        g = GaugeMetricFamily("ferry_work_items", "Work items queued, running or stuck, by destination backend",
                              labels=["backend", "state"])
        for backend, state, n in items:
            g.add_metric([backend, str(getattr(state, "value", state))], n)
        yield g
        last = GaugeMetricFamily("ferry_policy_last_pass_timestamp_seconds",
                                 "When a reconcile pass last considered the policy", labels=["policy"])
        conv = GaugeMetricFamily("ferry_policy_converged_timestamp_seconds",
                                 "When a pass last found nothing left to do for the policy", labels=["policy"])
        for name, last_pass, converged in passes:
            if last_pass is not None:
                last.add_metric([name], last_pass.timestamp())
            if converged is not None:
                conv.add_metric([name], converged.timestamp())
        yield last
        yield conv


def _v(x: object) -> str:
    return str(getattr(x, "value", x))


def _queues() -> Iterator[GaugeMetricFamily]:
    """Messages waiting in each of Ferry's queues, as the broker counts them (a passive
    declare: Redis sums the queue's priority lists, the filesystem broker counts files)."""
    from kombu.exceptions import ChannelError

    from tasks.app import CONTROL_QUEUE, INDEX_QUEUE, app, queue_for

    queues = [(CONTROL_QUEUE, ""), (INDEX_QUEUE, SEARCH_INDEX)] + \
        [(queue_for(name), name) for name in get_settings().backends()]
    depth = GaugeMetricFamily("ferry_queue_depth", "Messages waiting in each Celery queue, by the backend it serves",
                              labels=["queue", "backend"])
    up = GaugeMetricFamily("ferry_broker_up", "1 if the broker answered this scrape, else 0")
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            channel = conn.default_channel
            for queue, backend in queues:
                try:
                    _, count, _ = channel.queue_declare(queue=queue, passive=True)
                except ChannelError:  # never declared, or emptied and removed (Redis): nothing waits
                    channel = conn.channel()  # a refused passive declare may close the channel (AMQP)
                    count = 0
                depth.add_metric([queue, backend], count)
    except Exception as exc:
        log.warning("queue depths not read: the broker did not answer: %s: %s", type(exc).__name__, exc)
        up.add_metric([], 0)
        yield up
        return
    up.add_metric([], 1)
    yield up
    yield depth


registry = CollectorRegistry(auto_describe=False)
registry.register(CatalogCollector())


@operation(bp, "/metrics", "GET", summary="Prometheus metrics (text exposition format)", responses={200: None})
def metrics() -> Response:
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
