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


def send_spans(job_id: str, backend: str, seqs: list[int]) -> None:
    """Send a job's items (by seq) again as one batch to `backend`'s queue."""
    from ferry.catalog.jobs import spans_of

    if seqs:
        app.send_task("ferry.transfer", args=[job_id, [list(s) for s in spans_of(seqs)]], queue=queue_for(backend))


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


@signals.setup_logging.connect
def _logging(loglevel: int | str | None = None, **_kwargs) -> None:
    from ferry import logs

    logs.configure(loglevel)  # connected, so Celery leaves logging to us: JSON or text (ferry/logs.py)


_task_logs: dict[str, object] = {}


@signals.task_prerun.connect
def _task_context(task_id: str | None = None, task=None, **_kwargs) -> None:
    from ferry import logs

    if task_id is not None:
        _task_logs[task_id] = logs.bind(task=getattr(task, "name", None), task_id=task_id)


@signals.task_postrun.connect
def _task_context_end(task_id: str | None = None, **_kwargs) -> None:
    from ferry import logs

    token = _task_logs.pop(task_id, None) if task_id is not None else None
    if token is not None:
        try:
            logs.unbind(token)  # type: ignore[arg-type]
        except ValueError:  # set in another context (a thread pool): it ends with that context
            pass


_main_pid: int | None = None  # the worker's main process (pool processes inherit the value)


@signals.task_prerun.connect
def _drain_on_sigterm(**_kwargs) -> None:
    """In a pool process: SIGTERM means "finish what you started, requeue the rest" (billiard
    resets the handlers after worker_process_init, so it is set as a task starts)."""
    import os
    import signal

    from tasks.transfer import draining

    if _main_pid is not None and os.getpid() != _main_pid:
        signal.signal(signal.SIGTERM, lambda *_: draining.set())


@signals.worker_shutting_down.connect
def _drain_pool(**_kwargs) -> None:
    """Warm shutdown (SIGTERM to the worker): Celery waits for the tasks under way, and
    batches are long, so tell the pool processes to wind theirs down (SIGTERM, handled
    above); with the solo or threads pool the batches run here."""
    import os
    import signal
    from pathlib import Path

    from tasks.transfer import draining

    draining.set()
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@signals.celeryd_init.connect
def _worker_init(**_kwargs) -> None:
    """In the worker's main process, before its pool forks."""
    import os

    from tasks import metrics

    global _main_pid
    _main_pid = os.getpid()

    metrics.prepare()  # before the pool forks, so every pool process writes its counters there


@signals.worker_ready.connect
def _serve_metrics(**_kwargs) -> None:
    from tasks import metrics

    metrics.serve(get_settings().worker_metrics_port)


@signals.worker_shutdown.connect
def _metrics_cleanup(**_kwargs) -> None:
    from tasks import metrics

    metrics.cleanup()


@signals.worker_ready.connect
def _mirror_backends(**_kwargs) -> None:
    from ferry.catalog.db import transaction
    from ferry.catalog.replicas import sync_backends

    with transaction() as session:
        sync_backends(session, get_settings().backends())
