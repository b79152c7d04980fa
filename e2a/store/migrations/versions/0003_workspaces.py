"""Workspaces (a persistent /home/user per scope) and the sandbox's mounted workspace.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workspaces",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id"), nullable=False,
                  index=True),
        sa.Column("end_user_id", sa.String(64), nullable=False),
        sa.Column("app_id", sa.String(64), nullable=False),
        sa.Column("capset_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bytes_used", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("file_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("usage_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("user_id", "end_user_id", "app_id", "capset_id",
                            name="uq_workspace_scope"),
    )
    # A plain ADD COLUMN with its reference inline, not a batch: on SQLite a batch that adds a
    # foreign key copies the table, and dropping the old one fails while sandbox_events refers
    # to it (foreign keys are on). SQLite takes the inline REFERENCES; alembic only writes it
    # as a separate constraint, which SQLite cannot add.
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE sandboxes ADD COLUMN workspace_id VARCHAR(32) "
                   "REFERENCES workspaces (id)")
    else:
        op.add_column("sandboxes", sa.Column(
            "workspace_id", sa.String(32),
            sa.ForeignKey("workspaces.id", name="fk_sandboxes_workspace"), nullable=True))
    op.create_index("ix_sandboxes_workspace_id", "sandboxes", ["workspace_id"])


def downgrade() -> None:
    # SQLite: run with foreign keys off (the batch copies the sandboxes table).
    op.drop_index("ix_sandboxes_workspace_id", "sandboxes")
    with op.batch_alter_table("sandboxes") as t:
        t.drop_column("workspace_id")
    op.drop_table("workspaces")
