"""Several e2a replicas on one database (docs/kubernetes.md): which replica works on a sandbox
while it is created or torn down, and when anyone last used it.

Revision ID: 0009
Revises: 0008
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COLUMNS = [
    sa.Column("replica", sa.BigInteger, nullable=True),
    sa.Column("active_at", sa.DateTime(timezone=True), nullable=True),
]


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("sandboxes", column)


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.drop_column("sandboxes", column.name)
