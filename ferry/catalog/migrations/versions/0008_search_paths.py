"""Indexes for filtered search (and policy selectors): a GIN index on objects' tags (JSONB
containment, Postgres), and chunk ids with their owners in one index, so the owners of a
vector search's nearest chunks are read from the index alone

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 05:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_index("ix_objects_tags", "objects", ["tags"], postgresql_using="gin",
                        postgresql_ops={"tags": "jsonb_path_ops"})
        op.create_index("ix_search_chunks_id_owner", "search_chunks", ["id"], postgresql_include=["object_id"])
    else:
        # SQLite reads (id, object_id) from the table's rowid b-tree already; a JSON text
        # column gains nothing from a b-tree.
        pass


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_search_chunks_id_owner", table_name="search_chunks")
        op.drop_index("ix_objects_tags", table_name="objects")
