"""Per-user locks in PostgreSQL (advisory, held to the end of the transaction that takes them):
several e2a replicas on one database count one user's sandboxes, the credits held for their
creates, or their workspaces' leases, one after another, each seeing what the others committed. SQLite serves one
process, whose own locks (in memory) already order the counts: nothing is taken there."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

# The first key of the two-key form, one per thing counted; the second is the user's hash.
USER_LIMIT = 0x0E2B  # a user's live sandboxes (sandboxes/records.py)
FUNDS = 0x0E2C       # the credits held for a user's creates (billing/service.py)
WORKSPACES = 0x0E2D  # a user's workspace leases and deletes (workspaces/service.py)
QUOTA_SHARE = 0x0E2E  # the user's free workspace quota shared among their mounts (the same)
# Bounded: a holder cut off from the database mid-transaction would otherwise hold every
# create of this user until PostgreSQL noticed (the caller answers a retryable 503 instead).
WAIT = "10s"


class LockBusy(Exception):
    """The lock was not had within WAIT."""


async def lock_user(db: AsyncSession, kind: int, user_id: str) -> None:
    if db.bind.dialect.name != "postgresql":
        return
    try:  # one round trip: the wait's bound for this transaction, then the lock
        await db.execute(text("SELECT set_config('lock_timeout', :w, true), "
                              "pg_advisory_xact_lock(:c, hashtext(:u))"),
                         {"w": WAIT, "c": kind, "u": user_id})
    except DBAPIError as exc:
        raise LockBusy(str(exc)) from exc
