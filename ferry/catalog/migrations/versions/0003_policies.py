"""policies and their versions, replica checks, events; missing/stuck states; access,
legal hold and loss on objects; per-item action, source and policy

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import ferry.catalog.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = ferry.catalog.models.UTCDateTime(timezone=True)
Document = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
OPEN_OR_STUCK = "state IN ('queued', 'running', 'stuck')"


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=24)


REPLICA_STATES = ("pending", "copying", "present", "suspect", "bad", "deleting", "gone")
JOB_KINDS = ("migrate", "replicate")
ITEM_STATES = ("queued", "running", "done", "failed", "skipped", "cancelled")


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("created_at", When, nullable=False),
        sa.Column("kind", sa.String(length=63), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("cid", sa.String(length=128), nullable=True),
        sa.Column("policy", sa.String(length=63), nullable=True),
        sa.Column("backend", sa.String(length=63), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_events_created_at", "events", ["created_at"], unique=False)
    op.create_table(
        "policies",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("created_at", When, nullable=False),
        sa.Column("updated_at", When, nullable=False),
        sa.Column("deleted_at", When, nullable=True),
        sa.Column("next_run_at", When, nullable=True),
        sa.Column("run_started_at", When, nullable=True),
        sa.Column("last_pass_at", When, nullable=True),
        sa.Column("converged_at", When, nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "policy_versions",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("created_at", When, nullable=False),
        sa.PrimaryKeyConstraint("name", "version"),
    )
    op.create_table(
        "replica_checks",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("replica_id", Id, nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("checked_at", When, nullable=False),
        sa.Column("result", _enum("check_result", "ok", "bad", "missing"), nullable=False),
        sa.Column("bytes_read", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["replica_id"], ["replicas.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_replica_checks_job_id", "replica_checks", ["job_id"], unique=False)
    op.create_index("ix_replica_checks_replica_id", "replica_checks", ["replica_id"], unique=False)

    # batch_alter_table: ALTERs on Postgres, a table rebuild on SQLite (which cannot change
    # a CHECK constraint in place). `existing_type` lets the old enum CHECK be dropped.
    with op.batch_alter_table("job_items") as batch:
        batch.add_column(sa.Column("action", _enum("item_action", "copy", "delete", "verify"),
                                   server_default="copy", nullable=False))
        batch.add_column(sa.Column("source_backend", sa.String(length=63), nullable=True))
        batch.add_column(sa.Column("policy", sa.String(length=63), nullable=True))
        batch.alter_column("state", existing_type=_enum("item_state", *ITEM_STATES),
                           type_=_enum("item_state", *ITEM_STATES, "stuck"), existing_nullable=False)
    op.create_index("ix_job_items_open_object", "job_items", ["object_id", "dest_backend"], unique=False,
                    postgresql_where=sa.text(OPEN_OR_STUCK), sqlite_where=sa.text(OPEN_OR_STUCK))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("source_backend", existing_type=sa.String(length=63), nullable=True)
        batch.alter_column("kind", existing_type=_enum("job_kind", *JOB_KINDS),
                           type_=_enum("job_kind", *JOB_KINDS, "verify", "reconcile"), existing_nullable=False)
    with op.batch_alter_table("objects") as batch:
        batch.add_column(sa.Column("last_accessed_at", When, nullable=True))
        batch.add_column(sa.Column("legal_hold", sa.Boolean(), server_default=sa.text("false"), nullable=False))
        batch.add_column(sa.Column("lost_at", When, nullable=True))
        for column in ("metadata", "tags"):
            batch.alter_column(column, existing_type=sa.JSON(), type_=Document, existing_nullable=False,
                               postgresql_using=f"{column}::jsonb")
    with op.batch_alter_table("replicas") as batch:
        batch.alter_column("state", existing_type=_enum("replica_state", *REPLICA_STATES),
                           type_=_enum("replica_state", *REPLICA_STATES, "missing"), existing_nullable=False)
    op.create_index("ix_replicas_state", "replicas", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_replicas_state", table_name="replicas")
    with op.batch_alter_table("replicas") as batch:
        batch.alter_column("state", existing_type=_enum("replica_state", *REPLICA_STATES, "missing"),
                           type_=_enum("replica_state", *REPLICA_STATES), existing_nullable=False)
    with op.batch_alter_table("objects") as batch:
        for column in ("metadata", "tags"):
            batch.alter_column(column, existing_type=Document, type_=sa.JSON(), existing_nullable=False,
                               postgresql_using=f"{column}::json")
        batch.drop_column("lost_at")
        batch.drop_column("legal_hold")
        batch.drop_column("last_accessed_at")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("kind", existing_type=_enum("job_kind", *JOB_KINDS, "verify", "reconcile"),
                           type_=_enum("job_kind", *JOB_KINDS), existing_nullable=False)
        batch.alter_column("source_backend", existing_type=sa.String(length=63), nullable=False)
    op.drop_index("ix_job_items_open_object", table_name="job_items")
    with op.batch_alter_table("job_items") as batch:
        batch.alter_column("state", existing_type=_enum("item_state", *ITEM_STATES, "stuck"),
                           type_=_enum("item_state", *ITEM_STATES), existing_nullable=False)
        batch.drop_column("policy")
        batch.drop_column("source_backend")
        batch.drop_column("action")
    op.drop_table("replica_checks")
    op.drop_table("policy_versions")
    op.drop_table("policies")
    op.drop_index("ix_events_created_at", table_name="events")
    op.drop_table("events")
