"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from ferry.catalog.db import engine
from ferry.catalog.models import Base


def test_postgres_schema_matches_models():
    with engine().connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_db_upgrade_creates_the_sqlite_catalog(tmp_path):
    db = tmp_path / "c.db"
    env = {"FERRY_DATABASE_URL": f"sqlite:///{db}", "FERRY_DATA_DIR": str(tmp_path), "PATH": ""}
    ferry = str(Path(sys.executable).parent / "ferry")
    for _ in range(2):  # twice: upgrading an up-to-date catalog is a no-op
        r = subprocess.run([ferry, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "up to date" in r.stderr
    from sqlalchemy import create_engine, inspect

    tables = set(inspect(create_engine(f"sqlite:///{db}")).get_table_names())
    assert {"objects", "replicas", "backends", "jobs", "job_items", "alembic_version"} <= tables
