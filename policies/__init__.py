"""Declarative placement policies.

`schema.py` is the policy document (pydantic models, durations, sizes, label expressions,
schedules); selection in SQL and the planner of the reconcile loop sit beside it; `examples/`
holds documented example policies.
"""
