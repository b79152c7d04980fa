"""Agent sessions over a WebSocket.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chat_sessions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id"), nullable=False,
                  index=True),
        sa.Column("end_user_id", sa.String(64), nullable=False, index=True),
        sa.Column("app_id", sa.String(64), nullable=False),
        sa.Column("set_id", sa.String(64), nullable=False),
        sa.Column("capability_sets", sa.JSON, nullable=False),
        sa.Column("agent", sa.String(32), nullable=False),
        sa.Column("agent_version", sa.String(32), nullable=False),
        sa.Column("template", sa.String(32), nullable=False),
        sa.Column("vendor", sa.String(32), nullable=False),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("secrets", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("sandbox_id", sa.String(32), sa.ForeignKey("sandboxes.id"), nullable=True,
                  index=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.String(32), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("chat_sessions")
