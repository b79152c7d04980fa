"""Agents across replicas (docs/kubernetes.md "Agents"): where the API of the replica running a
task is, so that a follow-up task sent through another replica is passed on to it (the
agent's key is in that replica's memory only).

Revision ID: 0013
Revises: 0012
"""
import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("replica_url", sa.String(300), nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "replica_url")
