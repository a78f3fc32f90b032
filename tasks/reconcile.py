"""The reconcile loop, driven by Celery beat (`ferry.sweep`).

For jobs it closes the gap between what the catalog says is under way and what is
really happening: items whose worker died (expired lease) or whose message may have
been lost (queued too long) are sent again; listings that never ran are started
again; running jobs whose items are all final are ended. Sending twice is harmless:
workers claim only items that are still open.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

from ferry.catalog import jobs as catalog
from ferry.catalog.db import after_commit, transaction
from ferry.catalog.models import utcnow
from ferry.settings import get_settings
from tasks.app import app, send_batches, send_expand


@app.task(name="ferry.sweep")
def sweep() -> dict[str, int]:
    settings = get_settings()
    now = utcnow()
    requeue_after = timedelta(seconds=settings.requeue_after_seconds)
    with transaction() as session:
        stalled = catalog.requeue_stalled(session, now=now, requeue_after=requeue_after)
        by_dest: dict[tuple, list[int]] = defaultdict(list)
        for job_id, seq, backend in stalled:
            by_dest[(job_id, backend)].append(seq)
        batches = [
            catalog.Batch(job_id, backend, catalog.spans_of(seqs[i:i + settings.batch_items]))
            for (job_id, backend), seqs in by_dest.items()
            for i in range(0, len(seqs), settings.batch_items)
        ]
        after_commit(session, lambda: send_batches(batches))
        listings = [(str(j.id), j.source_backend)
                    for j in catalog.stalled_expansions(session, now=now, requeue_after=requeue_after)]
        after_commit(session, lambda: [send_expand(*listing) for listing in listings])
        ended = sum(1 for jid in catalog.finished_running_jobs(session) if catalog.finish_if_complete(session, jid))
    return {"requeued_items": len(stalled), "relisted_jobs": len(listings), "ended_jobs": ended}
