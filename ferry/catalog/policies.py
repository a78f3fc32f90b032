"""Queries that store policies, their versions and their schedule state, and the events
the reconcile loop raises. Documents arrive already validated (policies.schema)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ferry.catalog.models import (
    Event,
    ItemState,
    JobItem,
    Policy,
    PolicyVersion,
    utcnow,
)
from ferry.errors import Conflict, PolicyNotFound


def apply(session: Session, name: str, document: dict[str, Any], *, next_run_at: datetime | None) -> tuple[Policy, bool]:
    """Create or update a policy; return it and whether a new version was stored (applying
    the same document again changes nothing)."""
    now = utcnow()
    policy = session.get(Policy, name, with_for_update=True)
    if policy is not None and policy.deleted_at is None and policy.document == document:
        return policy, False
    if policy is None:
        policy = Policy(name=name, version=0, created_at=now)
        session.add(policy)
    policy.version += 1
    policy.document = document
    policy.updated_at = now
    policy.deleted_at = None
    policy.next_run_at = next_run_at
    policy.run_started_at = None
    policy.converged_at = None
    session.add(PolicyVersion(name=name, version=policy.version, document=document, created_at=now))
    session.flush()
    return policy, True


def get(session: Session, name: str, *, lock: bool = False) -> Policy:
    policy = session.get(Policy, name, with_for_update=lock)
    if policy is None or policy.deleted_at is not None:
        raise PolicyNotFound(f"no policy named {name!r}")
    return policy


def active(session: Session) -> list[Policy]:
    return list(session.scalars(select(Policy).where(Policy.deleted_at.is_(None)).order_by(Policy.name)))


def versions(session: Session, name: str) -> list[PolicyVersion]:
    return list(session.scalars(select(PolicyVersion).where(PolicyVersion.name == name)
                                .order_by(PolicyVersion.version)))


def delete(session: Session, name: str) -> Policy:
    """Stop enforcing a policy: its queued and stuck work is cancelled (running items
    finish), its versions stay, nothing stored is touched."""
    policy = get(session, name, lock=True)
    now = utcnow()
    policy.deleted_at = now
    policy.run_started_at = None
    policy.next_run_at = None
    session.execute(update(JobItem).where(JobItem.policy == name,
                                          JobItem.state.in_([ItemState.queued, ItemState.stuck]))
                    .values(state=ItemState.cancelled, error=f"policy {name} deleted", updated_at=now)
                    .execution_options(synchronize_session=False))
    return policy


def start_run(session: Session, name: str) -> Policy:
    """Open a run now, whatever the schedule (`ferry policy run`)."""
    policy = get(session, name, lock=True)
    if policy.run_started_at is not None:
        raise Conflict(f"policy {name!r} is already running (since {policy.run_started_at:%Y-%m-%d %H:%M:%S}Z)")
    policy.run_started_at = utcnow()
    return policy


def raise_event(session: Session, kind: str, severity: str, message: str, *,
                quiet_for: timedelta | None = None, **about: Any) -> bool:
    """Store an event. With `quiet_for`, not if one of the same kind about the same thing
    was raised that recently (a fault seen by every pass is one event an hour, not 120)."""
    now = utcnow()
    if quiet_for is not None:
        recent = select(Event.id).where(Event.kind == kind, Event.created_at > now - quiet_for,
                                        *(getattr(Event, k) == v for k, v in about.items() if k != "details"))
        if session.execute(recent.limit(1)).first() is not None:
            return False
    details = about.pop("details", None) or {}
    session.add(Event(kind=kind, severity=severity, message=message, details=details, created_at=now, **about))
    return True


def events(session: Session, *, kind: str | None, cid: str | None, after: int, limit: int) -> list[Event]:
    q = select(Event).where(Event.id > after)
    if kind:
        q = q.where(Event.kind == kind)
    if cid:
        q = q.where(Event.cid == cid)
    return list(session.scalars(q.order_by(Event.id).limit(limit)))
