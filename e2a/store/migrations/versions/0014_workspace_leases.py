"""Workspaces' leases in the database (workspaces/service.py): the user's quota is shared among
the mounts of every replica, and a delete through one replica and a create through another
are ordered (the workspace marked while its objects are deleted).

Revision ID: 0014
Revises: 0013
"""
import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workspace_leases",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.Column("replica", sa.BigInteger, nullable=True),
        sa.Column("sandbox_id", sa.String(32), nullable=True),
        sa.Column("node_name", sa.String(253), nullable=True),
        sa.Column("stored", sa.BigInteger, nullable=True),
        sa.Column("ended", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    for column in ("workspace_id", "user_id", "sandbox_id"):
        op.create_index(f"ix_workspace_leases_{column}", "workspace_leases", [column])
    op.add_column("workspaces", sa.Column("deleting_at", sa.DateTime(timezone=True),
                                          nullable=True))


def downgrade() -> None:
    op.drop_column("workspaces", "deleting_at")
    for column in ("workspace_id", "user_id", "sandbox_id"):
        op.drop_index(f"ix_workspace_leases_{column}", "workspace_leases")
    op.drop_table("workspace_leases")
