"""Celery side of Ferry: the app and its queues (app.py), one module per verb.

- jobs.py       submitting jobs, listing a source prefix into items (`ferry.expand`)
- transfer.py   copy / move with verification (`ferry.transfer`)
- reconcile.py  the reconcile pass (beat): re-sends lost work, ends jobs, enforces policies, heals

Messages carry ids only; the truth is in the catalog.
"""
