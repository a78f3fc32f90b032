"""Worker metrics: what this worker's pool did, counted as it happens (docs/metrics.md).

Celery's prefork pool runs tasks in child processes, so the counters use Prometheus'
multiprocess mode: each process writes its values to files in a directory private to this
worker (PROMETHEUS_MULTIPROC_DIR, made when the worker starts, before any child forks),
and the worker's main process sums them when scraped, on FERRY_WORKER_METRICS_PORT
(9808; 0 turns it off). Counters and histograms, so a recycled child's files still
count: totals never go back; and one gauge, the time of the last reconcile pass, whose
value is the latest any process of the pool wrote (dead ones too).

The catalog's view (replicas by state, jobs, queue depths, lost objects) is the API's
/metrics; this is the flow: items, bytes and batch latency per verb and backend.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
# Batch latency buckets: a batch is from milliseconds (skips) to an hour (task_time_limit).
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_metrics: dict[str, Any] = {}
_owned_dir: str | None = None


def prepare() -> None:
    """In the worker's main process, before the pool forks: a fresh directory for the
    pool's metric files, and prometheus_client's values kept there."""
    global _owned_dir
    if os.environ.get(ENV):
        return  # given by the operator (it must be emptied between runs: their job)
    _owned_dir = tempfile.mkdtemp(prefix="ferry-metrics-")
    os.environ[ENV] = _owned_dir
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        # Imported already (Celery loads Flower's command, which imports it): the value class
        # is chosen at import, so choose again now that the directory is set. Metrics are
        # made later, in the pool processes, and take this one.
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]


def serve(port: int) -> None:
    """In the worker's main process: serve every pool process's metrics on `port`."""
    if port == 0:
        return
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if os.environ.get(ENV):
        MultiProcessCollector(registry)
    else:
        registry = _registry_of_this_process()
    try:
        start_http_server(port, registry=registry)
    except OSError as exc:
        # Two workers on one host with the same port: the second still works, unscraped.
        log.error("worker metrics not served: port %d: %s (set FERRY_WORKER_METRICS_PORT)", port, exc)
        return
    log.info("worker metrics on :%d/metrics", port)


def cleanup() -> None:
    if _owned_dir is not None:
        shutil.rmtree(_owned_dir, ignore_errors=True)


def _registry_of_this_process() -> Any:
    from prometheus_client import REGISTRY

    _get("items")  # registers the metrics in the default registry
    return REGISTRY


def _get(name: str) -> Any:
    if not _metrics:
        from prometheus_client import Counter, Gauge, Histogram

        _metrics.update(
            items=Counter("ferry_items_processed", "Work items finished, by verb, backend and outcome",
                          ["verb", "backend", "outcome"]),
            bytes=Counter("ferry_transferred", "Bytes read or written for work items, by verb and backend",
                          ["verb", "backend"], unit="bytes"),
            duration=Histogram("ferry_task_duration_seconds", "Wall time of one batch task, by verb and backend",
                               ["verb", "backend"], buckets=BUCKETS),
            checks=Counter("ferry_verifications", "Replica checks, by backend and result", ["backend", "result"]),
            passes=Counter("ferry_reconcile_passes", "Reconcile passes this worker ran, by outcome "
                           "(done, skipped: another pass held the lock, failed)", ["outcome"]),
            last_pass=Gauge("ferry_reconcile_last_pass_timestamp_seconds",
                            "When this worker last finished a reconcile pass (Unix time)", multiprocess_mode="max"),
        )
    return _metrics[name]


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


def items_finished(plan: Any, rows: Iterable[dict[str, Any]]) -> None:
    """Count the outcomes ({seq, state, size}) of a claimed batch's items, just committed;
    an item put back in the queue for another try counts as `retried`."""
    items, nbytes = _get("items"), _get("bytes")
    by_seq = {i.seq: i for i in plan.items}
    for row in rows:
        item = by_seq.get(row["seq"])
        if item is None:
            continue
        verb, outcome = _value(item.action), _value(row["state"])
        items.labels(verb, item.dest_backend, "retried" if outcome == "queued" else outcome).inc()
        size = row.get("size") or 0
        if outcome == "done" and size:
            nbytes.labels(verb, item.dest_backend).inc(size)


def verb_of(plan: Any) -> str:
    verbs = {_value(i.action) for i in plan.items}
    return verbs.pop() if len(verbs) == 1 else "mixed"


def checked(rows: Iterable[Any]) -> None:
    """Count replica checks (ferry.catalog.replicas.Check) just committed."""
    checks = _get("checks")
    for c in rows:
        checks.labels(c.backend, _value(c.result)).inc()


def batch_seconds(verb: Any, backend: str, seconds: float) -> None:
    _get("duration").labels(_value(verb), backend).observe(seconds)


def reconcile_pass(outcome: str) -> None:
    """A reconcile pass ended: done (committed), skipped or failed."""
    _get("passes").labels(outcome).inc()
    if outcome == "done":
        _get("last_pass").set_to_current_time()
