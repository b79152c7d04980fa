"""Several e2a replicas on one PostgreSQL (docs/kubernetes.md "Replicas"): which one leads, and
whether another is alive. Both through PostgreSQL's advisory locks, held by a connection of
this replica's own, so that the database itself says it the moment a replica dies (its
connection closes and its locks go with it): no heartbeats, no lease timeouts to tune, nothing
but the database every replica already needs.

- Each replica holds a lock on its own random key while it runs; a row it works on (a create,
  a teardown) names that key, and a lock that stays free (GRACE: a replica whose database
  connection blinked takes its lock again within a second or two) means its replica is gone
  and the work is someone else's to finish.
- The leader holds the instance's leader lock: it alone runs the reaper, the warm pool's refill
  and the sweep after a replica's death. The others try for it every second.

With SQLite there is one process by definition: it leads, and only its own key is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from typing import Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

log = logging.getLogger("e2a.kube")

LEADER_CLASS = 0x0E2A  # the two-key form's first key: e2a's leader locks
TRY_EVERY = 1.0        # seconds between a follower's attempts, and the leader's checks
GRACE = 3.0            # seconds a replica's lock must stay free before it counts as gone
LOOKS_APART = 15.0     # seconds between two looks at a free lock that still count as "stayed"
# The lock connections: their own, never pooled (a pooled connection given back would keep its
# session's locks, held by nobody), every statement bounded, and a dead peer noticed by TCP
# keepalives in seconds rather than the kernel's two hours.
LOCK_CONNECT_ARGS = {"command_timeout": 10, "server_settings": {
    "tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "3",
    "lock_timeout": "5s"}}


def leader_key(instance: str) -> int:
    """The instance's leader lock (one e2a per database: its rows carry no instance)."""
    return int.from_bytes(hashlib.sha256(instance.encode()).digest()[:4], "big", signed=True)


class Replica:
    def __init__(self, engine: AsyncEngine, instance: str):
        self.instance = instance
        self.key = secrets.randbits(62) + 1  # this replica's liveness lock
        self.shared = engine.dialect.name == "postgresql"
        self.pooled = engine
        self.engine = create_async_engine(engine.url, poolclass=NullPool,
                                          connect_args=LOCK_CONNECT_ARGS) \
            if self.shared else engine
        self.leading = not self.shared
        self._free_since: dict[int, tuple[float, float]] = {}  # key -> (free since, last seen)
        self._conn: AsyncConnection | None = None
        self._task: asyncio.Task | None = None
        self._on_lead: Callable[[], Awaitable[None]] | None = None

    async def start(self, on_lead: Callable[[], Awaitable[None]]) -> None:
        """Take this replica's own lock and try once to lead (`on_lead` runs each time this
        replica becomes the leader, the first time before start returns); then keep trying."""
        self._on_lead = on_lead
        if self.shared:
            await self._connect()
            await self._try_lead()
            self._task = asyncio.create_task(self._run(), name="leader election")
        else:
            await on_lead()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close()
        if self.shared:
            await self.engine.dispose()
        self.leading = not self.shared

    async def gone(self, key: int | None) -> bool:
        """Has the replica whose lock key this is stopped (its lock seen free for GRACE, by
        looks at most LOOKS_APART apart: a key seen free once, long ago, proves nothing now)?"""
        if key == self.key:
            return False
        if key is None or not self.shared:
            return True
        async with self.engine.connect() as conn:  # closed after: a lock taken goes with it
            free = await conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})
        if not free:
            self._free_since.pop(key, None)
            return False
        now = time.monotonic()
        since, seen = self._free_since.get(key, (now, now))
        if now - seen > LOOKS_APART:
            since = now
        self._free_since[key] = (since, now)
        return now - since >= GRACE

    async def alive_now(self, key: int) -> bool:
        """Whether the replica with this key holds its lock at this moment (no grace: for
        passing it a caller's request, a replica that may be gone is gone). Read from
        pg_locks through the pooled engine: nothing is taken, no connection is opened."""
        if not self.shared or key == self.key:
            return False
        async with self.pooled.connect() as conn:
            return bool(await conn.scalar(text(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND objsubid = 1 AND classid::bigint = (CAST(:k AS bigint) >> 32)"
                " AND objid::bigint = (CAST(:k AS bigint) & 4294967295))"), {"k": key}))

    # ---- the election ------------------------------------------------------------------------

    async def _connect(self) -> None:
        self._conn = await self.engine.connect()
        # its own key again, unless a session the server has not yet seen die still holds it
        old = self.key
        while not await self._conn.scalar(text("SELECT pg_try_advisory_lock(:k)"),
                                          {"k": self.key}):
            self.key = secrets.randbits(62) + 1
        if self.key != old:
            # the rows this replica works on name it by its key: moved to the new one now,
            # while the old is still held, or they would look a dead replica's once it is free
            for table, column in (("sandboxes", "replica"), ("sandboxes", "agent_replica"),
                                  ("tasks", "replica"), ("chat_sessions", "replica")):
                await self._conn.execute(text(f"UPDATE {table} SET {column} = :new "
                                              f"WHERE {column} = :old"),
                                         {"new": self.key, "old": old})
            log.warning("this replica's lock key was still held: it goes on under a new one")
        await self._conn.commit()

    async def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.invalidate()  # the connection itself ends, and its locks
            self._conn = None

    async def _try_lead(self) -> None:
        got = await self._conn.scalar(text("SELECT pg_try_advisory_lock(:c, :k)"),
                                      {"c": LEADER_CLASS, "k": leader_key(self.instance)})
        await self._conn.commit()
        if got and not self.leading:
            self.leading = True
            log.info("this replica leads (reaper, warm pool, sweeps)")
            try:
                await self._on_lead()
            except Exception as exc:  # the sweep is tried again by the reaper's passes
                log.error("taking the lead: %s", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TRY_EVERY)
            try:
                if self._conn is None:
                    await self._connect()
                if self.leading:  # still connected, so still holding the lock
                    await self._conn.execute(text("SELECT 1"))
                    await self._conn.commit()
                else:
                    await self._try_lead()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection is gone, and with it both locks
                if self.leading:
                    log.warning("lost the lead (database connection: %s)", exc)
                self.leading = False
                await self._close()
