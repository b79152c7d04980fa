"""The funds check's holds in the database (billing/service.py `funds_for`): the creates of one
user through several replicas must see each other's minute held.

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credit_holds",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.String(40), nullable=False),
        sa.Column("amount_micro", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_credit_holds_user_id", "credit_holds", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_credit_holds_user_id", "credit_holds")
    op.drop_table("credit_holds")
