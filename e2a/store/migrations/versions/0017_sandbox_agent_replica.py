"""Agents across replicas (docs/kubernetes.md "Agents"): the replica holding a sandbox's agent,
and where its API is, from the agent's start on, so that a first task sent through another
replica is passed on to it (until now only a task's row named it: an agent with no task yet
could be reached through its own replica only).

Revision ID: 0017
Revises: 0016
"""
import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sandboxes", sa.Column("agent_replica", sa.BigInteger, nullable=True))
    op.add_column("sandboxes", sa.Column("agent_url", sa.String(300), nullable=True))


def downgrade() -> None:
    op.drop_column("sandboxes", "agent_url")
    op.drop_column("sandboxes", "agent_replica")
