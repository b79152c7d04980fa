"""Accounts and credits: login codes, balances, the ledger, meters and purchases.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _at(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _user() -> sa.Column:
    return sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id"), nullable=False,
                     index=True)


def upgrade() -> None:
    op.create_table(
        "login_codes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("email", sa.String(320), nullable=False, index=True),
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        _at("expires_at"), _at("used_at", True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "accounts",
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("balance_micro", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("stripe_customer_id", sa.String(255), nullable=True),
        sa.Column("payment_method_id", sa.String(255), nullable=True),
        sa.Column("topup_enabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("topup_threshold", sa.Integer, nullable=False, server_default="0"),
        sa.Column("topup_credits", sa.Integer, nullable=False, server_default="0"),
        sa.Column("topup_armed", sa.Boolean, nullable=False, server_default=sa.true()),
        _at("topup_failed_at", True),
        sa.Column("topup_error", sa.String(300), nullable=True),
        _at("created_at"),
    )
    op.create_table(
        "ledger",
        sa.Column("id", sa.String(32), primary_key=True),
        _user(),
        sa.Column("amount_micro", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False, index=True),
        sa.Column("description", sa.String(300), nullable=False),
        sa.Column("ref", sa.String(128), nullable=True, unique=True),
        sa.Column("sandbox_id", sa.String(32), nullable=True, index=True),
        sa.Column("workspace_id", sa.String(32), nullable=True),
        sa.Column("template", sa.String(32), nullable=True),
        sa.Column("vcpu_seconds", sa.Float, nullable=False, server_default="0"),
        sa.Column("gib_seconds", sa.Float, nullable=False, server_default="0"),
        sa.Column("gib_hours", sa.Float, nullable=False, server_default="0"),
        sa.Column("actor", sa.String(320), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    op.create_index("ix_ledger_user_created", "ledger", ["user_id", "created_at"])
    op.create_table(
        "sandbox_meters",
        sa.Column("sandbox_id", sa.String(32), primary_key=True),
        _user(),
        sa.Column("template", sa.String(32), nullable=False),
        sa.Column("vcpu_milli", sa.Integer, nullable=False),
        sa.Column("memory_mib", sa.Integer, nullable=False),
        sa.Column("rate_num", sa.BigInteger, nullable=False),
        _at("open_since", True),
        sa.Column("closed_ms", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("billed_ms", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("charged_micro", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_event_id", sa.Integer, nullable=False, server_default="0"),
        sa.Column("finished", sa.Boolean, nullable=False, server_default=sa.false(), index=True),
    )
    op.create_table(
        "storage_meters",
        sa.Column("workspace_id", sa.String(32), primary_key=True),
        _user(),
        _at("metered_at"),
        sa.Column("byte_seconds", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("charged_micro", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_table(
        "metering_cursor",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.Integer, nullable=False, server_default="0"),
    )
    # Metering starts at the upgrade: the feed's history (sandboxes that ran before credits
    # existed) is nobody's bill.
    op.execute("INSERT INTO metering_cursor (name, value) "
               "SELECT 'sandbox_events', COALESCE(MAX(id), 0) FROM sandbox_events")
    op.create_table(
        "purchases",
        sa.Column("id", sa.String(32), primary_key=True),
        _user(),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("credits", sa.Integer, nullable=False),
        sa.Column("amount_cents", sa.Integer, nullable=False),
        sa.Column("currency", sa.String(8), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("stripe_session_id", sa.String(255), nullable=True),
        sa.Column("stripe_payment_intent_id", sa.String(255), nullable=True),
        sa.Column("error", sa.String(300), nullable=True),
        _at("created_at"), _at("updated_at"),
    )
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        _at("received_at"),
    )


def downgrade() -> None:
    for table in ("stripe_events", "purchases", "metering_cursor", "storage_meters",
                  "sandbox_meters", "ledger", "accounts", "login_codes"):
        op.drop_table(table)
