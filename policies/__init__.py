"""Declarative placement policies and the reconciler that keeps them true.

Arrives with issue 3 (policy schema, selection in SQL, schedules, example YAML). Until
then, jobs are the only source of desired placement, and tasks/reconcile.py sweeps them.
"""
