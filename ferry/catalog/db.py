"""Engines, sessions and transactions.

`transaction()` is the one way code changes the catalog: everything in the block
commits together or not at all. `after_commit()` defers a side effect (sending a
Celery message) until the rows it refers to are committed, and drops it on rollback,
so a worker never receives an id it cannot read yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from ferry.settings import get_settings


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "isolation_level": None})
        event.listen(engine, "connect", _sqlite_on_connect)
        # Take the write lock at BEGIN: several worker processes share one file, and a
        # deferred transaction that upgrades to writing fails at once instead of waiting.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    # No server-side prepared statements: Postgres would reuse a generic plan made while
    # the tables were small (a sequential scan with a long OR filter) long after they grow.
    return create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=10,
                         connect_args={"prepare_threshold": None})


def _sqlite_on_connect(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()


def engine() -> Engine:
    return engine_for(get_settings().database)


@lru_cache(maxsize=8)
def _session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextmanager
def transaction() -> Iterator[Session]:
    """A session whose work commits at the end of the block, or rolls back on error."""
    session = _session_factory(get_settings().database)()
    try:
        with session.begin():
            yield session
    finally:
        session.close()


def dialect_insert(session: Session, model: type) -> Any:
    """INSERT with ON CONFLICT support for the session's database (Postgres or SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(model)


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the session's transaction commits; never if it rolls back."""
    session.info.setdefault("after_commit", []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    callbacks = session.info.pop("after_commit", [])
    for callback in callbacks:
        callback()


@event.listens_for(Session, "after_rollback")
def _drop_after_commit(session: Session) -> None:
    session.info.pop("after_commit", None)
