"""Alembic environment: migrates the database in FERRY_DATABASE_URL (or the embedded SQLite)."""

from alembic import context

from ferry.catalog.db import engine_for
from ferry.catalog.models import Base
from ferry.settings import get_settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().database

with engine_for(url).connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
