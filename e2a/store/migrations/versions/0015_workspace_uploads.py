"""Presigned PUTs in the database (workspaces/service.py): what a sized one holds of the user's
quota is seen by every replica and kept across a restart, until its file is in S3 or its URL
expires.

Revision ID: 0015
Revises: 0014
"""
import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workspace_uploads",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    for column in ("workspace_id", "user_id"):
        op.create_index(f"ix_workspace_uploads_{column}", "workspace_uploads", [column])


def downgrade() -> None:
    for column in ("workspace_id", "user_id"):
        op.drop_index(f"ix_workspace_uploads_{column}", "workspace_uploads")
    op.drop_table("workspace_uploads")
