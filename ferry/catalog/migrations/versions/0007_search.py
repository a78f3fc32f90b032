"""Search: documents extracted from objects, their chunks (Postgres tsvector + GIN, or an
FTS5 table kept by triggers on SQLite; embeddings), the vector index's snapshot state; the
index job kind and item action, the delete job kind (an object off every backend)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 01:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import TSVECTOR

from ferry.catalog.models import UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = UTCDateTime()
JOB_KINDS = ("migrate", "replicate", "verify", "reconcile", "deal")
ITEM_ACTIONS = ("copy", "delete", "verify", "deal")


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=24)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "search_documents",
        sa.Column("object_id", Id, nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("stale", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("name", sa.String(length=1024), nullable=True),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("media_type", sa.String(length=255), nullable=False),
        sa.Column("metadata_only", sa.Boolean(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("source_backend", sa.String(length=63), nullable=True),
        sa.Column("indexed_at", When, nullable=False),
        sa.ForeignKeyConstraint(["object_id"], ["objects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("object_id"),
    )
    op.create_index("ix_search_documents_indexed_at", "search_documents", ["indexed_at"])
    op.create_table(
        "search_chunks",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("object_id", Id, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("tsv", TSVECTOR().with_variant(sa.Text(), "sqlite"), nullable=True),
        sa.ForeignKeyConstraint(["object_id"], ["objects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_search_chunks_object_id", "search_chunks", ["object_id"])
    if sqlite:
        # FTS5 keeps its own copy of the text (name/title, tags, metadata, body) under the
        # chunk's rowid; a chunk's deletion (also by cascade from its object) removes its row.
        op.execute("CREATE VIRTUAL TABLE search_fts USING fts5(title, tags, meta, body, tokenize='porter unicode61')")
        op.execute("CREATE TRIGGER search_chunks_fts_delete AFTER DELETE ON search_chunks "
                   "BEGIN DELETE FROM search_fts WHERE rowid = old.id; END")
    else:
        op.create_index("ix_search_chunks_tsv", "search_chunks", ["tsv"], postgresql_using="gin")
    op.create_table(
        "search_index_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("snapshot", sa.String(length=255), nullable=True),
        sa.Column("vectors", sa.Integer(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=True),
        sa.Column("model", sa.String(length=255), nullable=True),
        sa.Column("updated_at", When, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # The one row, there from the start: publishers lock it, never race to insert it.
    op.execute("INSERT INTO search_index_state (id, generation, vectors, updated_at) "
               "VALUES (1, 0, 0, CURRENT_TIMESTAMP)")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("kind", existing_type=_enum("job_kind", *JOB_KINDS),
                           type_=_enum("job_kind", *JOB_KINDS, "index", "delete"), existing_nullable=False)
    with op.batch_alter_table("job_items") as batch:
        batch.alter_column("action", existing_type=_enum("item_action", *ITEM_ACTIONS),
                           type_=_enum("item_action", *ITEM_ACTIONS, "index"), existing_nullable=False,
                           existing_server_default="copy")


def downgrade() -> None:
    with op.batch_alter_table("job_items") as batch:
        batch.alter_column("action", existing_type=_enum("item_action", *ITEM_ACTIONS, "index"),
                           type_=_enum("item_action", *ITEM_ACTIONS), existing_nullable=False,
                           existing_server_default="copy")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("kind", existing_type=_enum("job_kind", *JOB_KINDS, "index", "delete"),
                           type_=_enum("job_kind", *JOB_KINDS), existing_nullable=False)
    op.drop_table("search_index_state")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS search_chunks_fts_delete")
        op.execute("DROP TABLE IF EXISTS search_fts")
    op.drop_table("search_chunks")
    op.drop_table("search_documents")
