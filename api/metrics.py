"""/metrics: Prometheus gauges read from the catalog at scrape time, so every API replica
reports the same truth whichever process did the work (objects lost, replicas by state,
work in flight and stuck, each policy's last pass)."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select

from api.openapi import operation
from ferry.catalog.db import transaction
from ferry.catalog.models import ItemState, JobItem, Policy, Replica, StoredObject

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
        g = GaugeMetricFamily("ferry_objects_lost", "Objects with no verified replica left (alert on > 0)")
        g.add_metric([], lost or 0)
        yield g
        g = GaugeMetricFamily("ferry_replicas", "Replicas by backend and state", labels=["backend", "state"])
        for backend, state, n in replicas:
            g.add_metric([backend, str(getattr(state, "value", state))], n)
        yield g
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


registry = CollectorRegistry(auto_describe=False)
registry.register(CatalogCollector())


@operation(bp, "/metrics", "GET", summary="Prometheus metrics (text exposition format)", responses={200: None})
def metrics() -> Response:
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
