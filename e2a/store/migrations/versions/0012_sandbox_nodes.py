"""Workspaces on Kubernetes (docs/kubernetes.md "Workspaces"): the node whose agent mounted a
sandbox's workspace, asked to upload and unmount it at the teardown even when that node is
cordoned, not ready or its pod already gone.

Revision ID: 0012
Revises: 0011
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sandboxes", sa.Column("node_name", sa.String(253), nullable=True))


def downgrade() -> None:
    op.drop_column("sandboxes", "node_name")
