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
    with op.batch_alter_table("sandboxes") as t:
        t.add_column(sa.Column("workspace_id", sa.String(32), nullable=True))
        t.create_index("ix_sandboxes_workspace_id", ["workspace_id"])
        t.create_foreign_key("fk_sandboxes_workspace", "workspaces", ["workspace_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as t:
        t.drop_constraint("fk_sandboxes_workspace", type_="foreignkey")
        t.drop_index("ix_sandboxes_workspace_id")
        t.drop_column("workspace_id")
    op.drop_table("workspaces")
