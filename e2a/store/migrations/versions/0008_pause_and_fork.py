"""Pause, resume and fork: how a sandbox treats idleness, and what its pause and lineage are.

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

COLUMNS = [
    sa.Column("on_idle", sa.String(8), nullable=False, server_default="destroy"),
    sa.Column("auto_resume", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("disk_bytes", sa.BigInteger, nullable=True),
    sa.Column("forked_from", sa.String(32), nullable=True),
    sa.Column("secrets_of", sa.String(32), nullable=True),
]


# A paused sandbox's disk is billed as storage (docs/billing.md): the size each pause held
# (on its `paused` event) and its meter's storage marks.
EVENT_COLUMNS = [sa.Column("disk_bytes", sa.BigInteger, nullable=True)]
METER_COLUMNS = [
    sa.Column("paused_since", sa.DateTime(timezone=True), nullable=True),
    sa.Column("paused_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("paused_byte_s", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("storage_billed_byte_s", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("storage_charged_micro", sa.BigInteger, nullable=False, server_default="0"),
]
TABLES = {"sandboxes": COLUMNS, "sandbox_events": EVENT_COLUMNS, "sandbox_meters": METER_COLUMNS}


def upgrade() -> None:
    # Plain ADD COLUMNs (SQLite takes them with constant defaults): no table copy, which on
    # SQLite would have to rebuild `sandboxes` under the tables that refer to it.
    for table, columns in TABLES.items():
        for column in columns:
            op.add_column(table, column)


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35 on), for the same reason
    for table, columns in TABLES.items():
        for column in reversed(columns):
            op.drop_column(table, column.name)
