"""Sessions across replicas (docs/kubernetes.md "Sessions"): the replica that holds a session's
agent, and where its API is, so that a WebSocket through any other replica is relayed to it;
and whether a client is connected, which only that replica knows.

Revision ID: 0016
Revises: 0015
"""
import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("chat_sessions", sa.Column("replica", sa.BigInteger, nullable=True))
    op.add_column("chat_sessions", sa.Column("replica_url", sa.String(300), nullable=True))
    op.add_column("chat_sessions", sa.Column("connected", sa.Boolean, nullable=False,
                                             server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("chat_sessions", "connected")
    op.drop_column("chat_sessions", "replica_url")
    op.drop_column("chat_sessions", "replica")
