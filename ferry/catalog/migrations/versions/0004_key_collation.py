"""replicas.key in the C collation on Postgres: key prefixes become index ranges

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 19:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":  # SQLite compares bytes (BINARY) already
        op.alter_column("replicas", "key", existing_type=sa.String(1024), type_=sa.String(1024, collation="C"),
                        existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("replicas", "key", existing_type=sa.String(1024, collation="C"), type_=sa.String(1024),
                        existing_nullable=False)
