"""Agents' tasks on several e2a replicas (docs/kubernetes.md): which replica runs a task (its
LLM key is in that replica's memory only), and a cancel asked for through another replica.

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

COLUMNS = [
    sa.Column("replica", sa.BigInteger, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
]


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("tasks", column)


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.drop_column("tasks", column.name)
