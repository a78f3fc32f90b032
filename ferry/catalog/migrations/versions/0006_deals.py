"""Filecoin: storage providers, pieces and the objects in them, deals, deal schedules;
the deal job kind and item action

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 21:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ferry.catalog.models import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = UTCDateTime()
JOB_KINDS = ("migrate", "replicate", "verify", "reconcile")
ITEM_ACTIONS = ("copy", "delete", "verify")
DEAL_STATES = ("planned", "proposed", "published", "active", "expiring", "expired", "rejected", "failed",
               "slashed")


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=24)


def upgrade() -> None:
    op.create_table(
        "providers",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("region", sa.String(length=63), nullable=True),
        sa.Column("price", sa.BigInteger(), nullable=False),
        sa.Column("verified_price", sa.BigInteger(), nullable=False),
        sa.Column("min_piece_size", sa.BigInteger(), nullable=False),
        sa.Column("max_piece_size", sa.BigInteger(), nullable=False),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("retrieval_url", sa.String(length=1024), nullable=True),
        sa.Column("access", _enum("provider_access", "auto", "allow", "deny"), nullable=False),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.Column("updated_at", When, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "pieces",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("piece_cid", sa.String(length=128), nullable=False),
        sa.Column("padded_size", sa.BigInteger(), nullable=False),
        sa.Column("car_size", sa.BigInteger(), nullable=False),
        sa.Column("root_cid", sa.String(length=128), nullable=False),
        sa.Column("backend", sa.String(length=63), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("piece_cid"),
    )
    op.create_table(
        "piece_objects",
        sa.Column("piece_id", Id, nullable=False),
        sa.Column("object_id", Id, nullable=False),
        sa.ForeignKeyConstraint(["piece_id"], ["pieces.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["object_id"], ["objects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("piece_id", "object_id"),
    )
    op.create_index("ix_piece_objects_object_id", "piece_objects", ["object_id"], unique=False)
    op.create_table(
        "deals",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("piece_id", Id, nullable=False),
        sa.Column("backend", sa.String(length=63), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("client", sa.String(length=128), nullable=False),
        sa.Column("state", _enum("deal_state", *DEAL_STATES), nullable=False),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("price_per_epoch", sa.BigInteger(), nullable=True),
        sa.Column("duration", sa.BigInteger(), nullable=False),
        sa.Column("start_epoch", sa.BigInteger(), nullable=True),
        sa.Column("end_epoch", sa.BigInteger(), nullable=True),
        sa.Column("sector_start_epoch", sa.BigInteger(), nullable=True),
        sa.Column("chain_deal_id", sa.BigInteger(), nullable=True),
        sa.Column("proposal_id", sa.String(length=128), nullable=True),
        sa.Column("token_hash", sa.String(length=64), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("retry_of", sa.Uuid(), nullable=True),
        sa.Column("renewal_of", sa.Uuid(), nullable=True),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("schedule", sa.String(length=63), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.Column("proposed_at", When, nullable=True),
        sa.Column("published_at", When, nullable=True),
        sa.Column("activated_at", When, nullable=True),
        sa.Column("ended_at", When, nullable=True),
        sa.Column("updated_at", When, nullable=False),
        sa.ForeignKeyConstraint(["piece_id"], ["pieces.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_deals_state", "deals", ["state"], unique=False)
    op.create_index("ix_deals_piece", "deals", ["piece_id"], unique=False)
    op.create_table(
        "deal_schedules",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("backend", sa.String(length=63), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", When, nullable=True),
        sa.Column("last_run_at", When, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.Column("updated_at", When, nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # batch_alter_table: ALTERs on Postgres, a table rebuild on SQLite (CHECKs change there).
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("kind", existing_type=_enum("job_kind", *JOB_KINDS),
                           type_=_enum("job_kind", *JOB_KINDS, "deal"), existing_nullable=False)
    with op.batch_alter_table("job_items") as batch:
        batch.alter_column("action", existing_type=_enum("item_action", *ITEM_ACTIONS),
                           type_=_enum("item_action", *ITEM_ACTIONS, "deal"), existing_nullable=False,
                           existing_server_default="copy")


def downgrade() -> None:
    with op.batch_alter_table("job_items") as batch:
        batch.alter_column("action", existing_type=_enum("item_action", *ITEM_ACTIONS, "deal"),
                           type_=_enum("item_action", *ITEM_ACTIONS), existing_nullable=False,
                           existing_server_default="copy")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("kind", existing_type=_enum("job_kind", *JOB_KINDS, "deal"),
                           type_=_enum("job_kind", *JOB_KINDS), existing_nullable=False)
    op.drop_table("deal_schedules")
    op.drop_index("ix_deals_piece", table_name="deals")
    op.drop_index("ix_deals_state", table_name="deals")
    op.drop_table("deals")
    op.drop_index("ix_piece_objects_object_id", table_name="piece_objects")
    op.drop_table("piece_objects")
    op.drop_table("pieces")
    op.drop_table("providers")
