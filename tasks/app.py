"""The Celery app, its queues (one per configured backend) and message sending.

Each backend has its own queue, `backend.<name>`, so its workers scale on their own;
work on an object goes to the queue of the backend that does the scarce work (the
destination of a copy, the source of a listing). `ferry.control` carries the reconcile
pass, which beat sends every FERRY_RECONCILE_INTERVAL_SECONDS.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from celery import Celery, signals
from kombu import Exchange, Queue

from ferry.catalog.jobs import Batch
from ferry.catalog.models import SEARCH_INDEX
from ferry.settings import Settings, get_settings

CONTROL_QUEUE = "ferry.control"
# Indexing for search: its own workers (they hold the embedding model), scaled on their own.
INDEX_QUEUE = "index"


def queue_for(backend: str) -> str:
    """The queue of a backend's work; index work (destination SEARCH_INDEX) has its own."""
    return INDEX_QUEUE if backend == SEARCH_INDEX else f"backend.{backend}"


def _queue(name: str) -> Queue:
    # Each queue its own direct exchange and routing key: left to defaults, Celery binds
    # every queue to the default exchange under one key, and a message reaches them all.
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def broker_options(settings: Settings) -> dict:
    # The visibility timeout must exceed the longest batch (task_time_limit, checked by
    # Settings), or Redis hands an unacknowledged batch to a second worker.
    options: dict = {"visibility_timeout": settings.visibility_timeout}
    if settings.broker.startswith("filesystem://"):
        folder = settings.embedded_broker_dir
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        options.update(data_folder_in=str(folder / "queue"), data_folder_out=str(folder / "queue"),
                       control_folder=str(folder / "control"), store_processed=False)
    return options


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    settings.data_path.mkdir(parents=True, exist_ok=True)  # beat keeps its schedule here
    backends = settings.backends()
    app = Celery("ferry", include=["tasks.jobs", "tasks.transfer", "tasks.reconcile", "tasks.deals",
                                    "tasks.index"])
    app.conf.update(
        broker_url=settings.broker,
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=CONTROL_QUEUE,
        task_queues=[_queue(CONTROL_QUEUE), _queue(INDEX_QUEUE)] + [_queue(queue_for(name)) for name in backends],
        task_routes={"ferry.reconcile": {"queue": CONTROL_QUEUE}, "ferry.deals.track": {"queue": CONTROL_QUEUE},
                     "ferry.index.publish": {"queue": INDEX_QUEUE}},
        worker_send_task_events=True,
        task_send_sent_event=True,
        beat_schedule={
            # A pass that could not start before the next is due is dropped, not piled up.
            "reconcile": {"task": "ferry.reconcile", "schedule": settings.reconcile_interval_seconds,
                          "options": {"expires": settings.reconcile_interval_seconds}},
            # Deal tracking asks the deal tool and the chain; each filecoin backend's own
            # queue does it (ferry.deals.track fans out).
            "deals": {"task": "ferry.deals.track", "schedule": settings.deal_track_seconds,
                      "options": {"expires": settings.deal_track_seconds}},
            # Index workers publish the vector index after each batch; this catches up on
            # removals (and is a no-op where nothing was ever indexed).
            "search": {"task": "ferry.index.publish", "schedule": settings.search_publish_seconds,
                       "options": {"expires": settings.search_publish_seconds}},
        },
        beat_schedule_filename=str(settings.data_path / "celerybeat-schedule"),
    )
    return app


app = make_app()


def send_batches(batches: Iterable[Batch]) -> int:
    """Send one `ferry.transfer` message per batch, to its destination's queue."""
    sent = 0
    with app.producer_or_acquire() as producer:
        for b in batches:
            app.send_task("ferry.transfer", args=[str(b.job_id), [list(s) for s in b.spans]],
                          queue=queue_for(b.backend), producer=producer)
            sent += 1
    return sent


def send_expand(job_id: str, source_backend: str) -> None:
    app.send_task("ferry.expand", args=[job_id], queue=queue_for(source_backend))


def send_publish() -> None:
    """Have an index worker publish the vector index now (after entries were removed)."""
    app.send_task("ferry.index.publish", queue=INDEX_QUEUE)


def send_reconcile() -> None:
    """Ask for a reconcile pass now (a policy run, a retry, a finished verification)."""
    app.send_task("ferry.reconcile", queue=CONTROL_QUEUE)


def backoff(retries: int, *, base: float = 2.0, cap: float = 300.0) -> float:
    """Exponential backoff with full jitter, for transient failures."""
    return random.uniform(0, min(cap, base * 2**retries))


@signals.worker_ready.connect
def _mirror_backends(**_kwargs) -> None:
    from ferry.catalog.db import transaction
    from ferry.catalog.replicas import sync_backends

    with transaction() as session:
        sync_backends(session, get_settings().backends())
