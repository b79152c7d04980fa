"""The ledger: append-only, integer micro-credits, one row per change of a balance.

Every change goes through `post`, inside the caller's transaction: it appends the entry and adds
its amount to the account's cached balance in one statement (`balance = balance + amount`, so
concurrent posts never lose one). An entry with a `ref` happens at most once: a second post of
the same ref is a no-op (the database's unique index decides, not a read before the write).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from e2a.ids import new_id
from e2a.sandboxes.records import utcnow
from e2a.billing.rates import MICRO
from e2a.store.models import Account, LedgerEntry

KINDS = ("grant", "purchase", "usage", "storage", "refund", "adjustment", "topup_failed")


def insert(db: AsyncSession, table):
    """An INSERT that can take ON CONFLICT DO NOTHING on either database."""
    dialect = db.bind.dialect.name
    return (postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table))


async def ensure_account(db: AsyncSession, user_id: str, free_credits: int) -> None:
    """The user's account, opened with the free credits the first time (once per account,
    also for users made before accounts existed). Safe to race: both inserts are idempotent."""
    if await db.get(Account, user_id) is not None:
        return
    await db.execute(insert(db, Account.__table__).values(
        user_id=user_id, balance_micro=0, created_at=utcnow()).on_conflict_do_nothing())
    if free_credits:
        await post(db, user_id, free_credits * MICRO, "grant",
                   f"{free_credits} free credits for a new account", ref=f"signup:{user_id}")


async def post(db: AsyncSession, user_id: str, amount_micro: int, kind: str, description: str,
               *, ref: str | None = None, at: datetime | None = None, **fields) -> str | None:
    """Append an entry and move the balance by it. Returns the entry's id, or None when an
    entry with this ref already exists (nothing changed)."""
    assert kind in KINDS, kind
    entry_id = new_id("txn")
    stmt = insert(db, LedgerEntry.__table__).values(
        id=entry_id, user_id=user_id, amount_micro=amount_micro, kind=kind,
        description=description[:300], ref=ref, created_at=at or utcnow(), **fields)
    if ref is not None:
        stmt = stmt.on_conflict_do_nothing(index_elements=["ref"])
    result = await db.execute(stmt)
    if result.rowcount == 0:
        return None
    if amount_micro:
        await db.execute(update(Account).where(Account.user_id == user_id)
                         .values(balance_micro=Account.balance_micro + amount_micro))
    return entry_id


def entry(user_id: str, amount_micro: int, kind: str, description: str, *,
          ref: str | None = None, sandbox_id: str | None = None, workspace_id: str | None = None,
          template: str | None = None, vcpu_seconds: float = 0.0, gib_seconds: float = 0.0,
          gib_hours: float = 0.0, at: datetime | None = None) -> dict:
    """A row for `post_many` (every row has every column, as one INSERT needs)."""
    assert kind in KINDS, kind
    return {"id": new_id("txn"), "user_id": user_id, "amount_micro": amount_micro, "kind": kind,
            "description": description[:300], "ref": ref, "sandbox_id": sandbox_id,
            "workspace_id": workspace_id, "template": template, "vcpu_seconds": vcpu_seconds,
            "gib_seconds": gib_seconds, "gib_hours": gib_hours, "actor": None,
            "created_at": at or utcnow()}


async def post_many(db: AsyncSession, rows: list[dict]) -> None:
    """Append many entries (a metering tick's) in one INSERT, and move each user's balance by
    their sum in one UPDATE per user. Refs must be new: a repeated one fails the whole
    transaction (its caller holds the lock that makes them unique)."""
    if not rows:
        return
    await db.execute(LedgerEntry.__table__.insert(), rows)
    totals: dict[str, int] = {}
    for row in rows:
        totals[row["user_id"]] = totals.get(row["user_id"], 0) + row["amount_micro"]
    moves = [{"uid": u, "amount": a} for u, a in totals.items() if a]
    if moves:
        table = Account.__table__
        await db.execute(table.update().where(table.c.user_id == bindparam("uid"))
                         .values(balance_micro=table.c.balance_micro + bindparam("amount")),
                         moves)


async def balance(db: AsyncSession, user_id: str) -> int:
    """The cached balance in micro-credits (0 for a user without an account yet)."""
    value = await db.scalar(select(Account.balance_micro).where(Account.user_id == user_id))
    return value or 0


async def ledger_sum(db: AsyncSession, user_id: str) -> int:
    """The balance as the ledger says it (the cache must always equal this)."""
    value = await db.scalar(select(func.coalesce(func.sum(LedgerEntry.amount_micro), 0))
                            .where(LedgerEntry.user_id == user_id))
    return int(value or 0)


async def entries(db: AsyncSession, user_id: str, limit: int, offset: int) -> list[LedgerEntry]:
    q = (select(LedgerEntry).where(LedgerEntry.user_id == user_id)
         .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc())
         .limit(limit).offset(offset))
    return list((await db.execute(q)).scalars().all())
