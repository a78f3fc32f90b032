"""Celery side of Ferry: the app and its queues (app.py), one module per verb.

- jobs.py       submitting jobs, listing a source prefix into items (`ferry.expand`)
- transfer.py   copy / move with verification (`ferry.transfer`)
- reconcile.py  the beat-driven sweep that re-sends lost work and ends finished jobs

Messages carry ids only; the truth is in the catalog.
"""
