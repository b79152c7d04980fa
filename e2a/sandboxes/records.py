"""The store's side of sandboxes: their rows and the transition feed, and the catalog the API
reads. Every state change is one transaction that updates the row and appends its event, so
the feed and the row never disagree. No session is held across anything but its own query.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Callable

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from e2a.sandboxes.host import (Catalog, SandboxEventRecord, SandboxRecord, Unavailable,
                                UserLimit)
from e2a.sandboxes.states import LIVE, State
from e2a.store import locks
from e2a.store.models import Sandbox, SandboxEvent


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they were stored as UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def pause_expiry(paused_at: datetime | None, paused_ttl: int) -> datetime | None:
    """When a sandbox paused at `paused_at` is destroyed (E2A_PAUSED_TTL after)."""
    return paused_at + timedelta(seconds=paused_ttl) if paused_at else None


def record_of(row: Sandbox, node: str, paused_ttl: int = 0) -> SandboxRecord:
    paused_at = aware(row.paused_at)
    return SandboxRecord(
        id=row.id, user_id=row.user_id, node=node, template=row.template, state=row.state,
        vcpu=row.vcpu, cpu_fraction=row.cpu_fraction, memory_mib=row.memory_mib,
        internet=row.internet, metadata=row.metadata_ or {},
        idle_timeout_seconds=row.idle_timeout_seconds,
        max_lifetime_seconds=row.max_lifetime_seconds, created_at=aware(row.created_at),
        expires_at=aware(row.expires_at), destroyed_at=aware(row.destroyed_at),
        end_reason=row.end_reason, workspace_id=row.workspace_id, on_idle=row.on_idle,
        auto_resume=row.auto_resume, paused_at=paused_at,
        pause_expires_at=pause_expiry(paused_at, paused_ttl),
        disk_bytes=row.disk_bytes, forked_from=row.forked_from, secrets_of=row.secrets_of)


class Records:
    def __init__(self, sessions: async_sessionmaker):
        self.sessions = sessions

    async def insert(self, row: Sandbox, reason: str | None, user_cap: int = 0) -> None:
        """A new row and its first event. `user_cap`: refuse (UserLimit) if its user already
        has that many live sandboxes, counted in the same transaction."""
        async with self.sessions() as db:
            if user_cap and row.user_id:
                await within_user_limit(db, row.user_id, user_cap, row.id)
            db.add(row)
            await db.flush()
            db.add(SandboxEvent(sandbox_id=row.id, from_state=None, to_state=row.state,
                                reason=reason, at=row.created_at))
            await db.commit()

    async def transition(self, sandbox_id: str, old: State | None, new: State, reason: str | None,
                         detail: str | None = None, only_from: State | None = None,
                         unclaimed: bool = False, **values) -> bool:
        """The row's new state and `values`, and the event; a pause's `disk_bytes` goes on both
        (metering bills each pause for the size it held). With `only_from`, only if the row is
        still in that state (replicas: another may have moved it); False if it was not.
        `unclaimed`: only a warm sandbox nobody has claimed."""
        table = Sandbox.__table__
        q = table.update().where(table.c.id == sandbox_id)
        if only_from is not None:
            q = q.where(table.c.state == only_from.value)
        if unclaimed:
            q = q.where(table.c.user_id.is_(None))
        async with self.sessions() as db:
            if (await db.execute(q.values(state=new.value, **values))).rowcount == 0 \
                    and (only_from is not None or unclaimed):
                return False
            # A destroy's event has the row's time: metering closes the meter at either,
            # whichever of the two a tick reads first (metering._charge_open).
            db.add(SandboxEvent(sandbox_id=sandbox_id, from_state=old.value if old else None,
                                to_state=new.value, reason=reason,
                                detail=detail[:500] if detail else None,
                                at=values.get("destroyed_at") or utcnow(),
                                disk_bytes=values.get("disk_bytes")))
            await db.commit()
        return True

    async def claim(self, sandbox_id: str, user_id: str, metadata: dict, user_cap: int = 0,
                    **values) -> bool:
        """A warm sandbox handed to a user: one UPDATE (Core; the ORM's costs ~7 ms more here)
        and its event in the feed (billing starts here). Only a running one nobody claimed:
        False if another replica was first. `user_cap` as for insert."""
        table = Sandbox.__table__
        async with self.sessions() as db:
            if user_cap:
                await within_user_limit(db, user_id, user_cap, sandbox_id)
            done = await db.execute(table.update().where(
                table.c.id == sandbox_id, table.c.user_id.is_(None),
                table.c.state == State.RUNNING.value).values(
                    user_id=user_id, metadata=metadata, **values))
            if done.rowcount == 0:
                return False
            await db.execute(SandboxEvent.__table__.insert().values(
                sandbox_id=sandbox_id, from_state=State.RUNNING.value,
                to_state=State.RUNNING.value, reason="claimed", detail=f"by {user_id}",
                at=utcnow()))
            await db.commit()
        return True

    async def set_node(self, sandbox_id: str, node_name: str) -> None:
        """Where its workspace is mounted (Kubernetes), before the mount is made."""
        table = Sandbox.__table__
        async with self.sessions() as db:
            await db.execute(table.update().where(table.c.id == sandbox_id)
                             .values(node_name=node_name))
            await db.commit()

    async def active(self, sandbox_ids: list[str], at: datetime) -> None:
        """Calls went into these sandboxes until `at` (the idle timeout's clock, shared by
        replicas)."""
        table = Sandbox.__table__
        async with self.sessions() as db:
            await db.execute(table.update().where(table.c.id.in_(sandbox_ids))
                             .values(active_at=at))
            await db.commit()

    async def live_rows(self) -> list[Sandbox]:
        async with self.sessions() as db:
            q = select(Sandbox).where(Sandbox.state.in_([s.value for s in LIVE]))
            return list((await db.execute(q)).scalars().all())

    async def running_owned(self) -> list[Sandbox]:
        """Running sandboxes that belong to a user (not waiting in a warm pool)."""
        async with self.sessions() as db:
            q = select(Sandbox).where(Sandbox.state == State.RUNNING.value,
                                      Sandbox.user_id.is_not(None))
            return list((await db.execute(q)).scalars().all())

    async def get(self, sandbox_id: str) -> Sandbox | None:
        async with self.sessions() as db:
            return await db.get(Sandbox, sandbox_id)

    async def mark_unknown_destroyed(self, sandbox_id: str, reason: str, detail: str) -> None:
        """A row left in a live state that no host runs (e.g. after a crash during create)."""
        async with self.sessions() as db:
            await db.execute(update(Sandbox).where(Sandbox.id == sandbox_id).values(
                state=State.DESTROYED.value, end_reason=reason, host_reason=detail[:200],
                destroyed_at=utcnow()))
            await db.commit()


class StoreCatalog(Catalog):
    """Backed by the store. A sandbox this process runs is answered from memory (`live`), which
    the manager keeps in step with every transition, so an exec's ownership check makes no query."""

    def __init__(self, records: Records, live: Callable[[str], SandboxRecord | None], node: str,
                 paused_ttl: int = 0):
        self.records, self._live, self.node = records, live, node
        self.paused_ttl = paused_ttl

    async def get(self, sandbox_id: str) -> SandboxRecord | None:
        if len(sandbox_id) > 32:
            return None
        rec = self._live(sandbox_id)
        if rec is not None:
            return rec
        row = await self.records.get(sandbox_id)
        return record_of(row, self.node, self.paused_ttl) if row is not None else None

    async def list(self, user_id: str, state: str | None = None) -> list[SandboxRecord]:
        q = select(Sandbox).where(Sandbox.user_id == user_id)
        q = q.where(Sandbox.state == state) if state else q.where(
            Sandbox.state != State.DESTROYED.value)
        async with self.records.sessions() as db:
            rows = (await db.execute(q.order_by(Sandbox.created_at.desc()).limit(1000))
                    ).scalars().all()
        return [record_of(r, self.node, self.paused_ttl) for r in rows]

    async def events(self, sandbox_id: str) -> list[SandboxEventRecord]:
        q = (select(SandboxEvent).where(SandboxEvent.sandbox_id == sandbox_id)
             .order_by(SandboxEvent.id))
        async with self.records.sessions() as db:
            rows = (await db.execute(q)).scalars().all()
        return [SandboxEventRecord(from_state=r.from_state, to_state=r.to_state, reason=r.reason,
                                   detail=r.detail, at=aware(r.at)) for r in rows]


async def within_user_limit(db: AsyncSession, user_id: str, cap: int, sandbox_id: str) -> None:
    """Raise UserLimit if the user has `cap` live sandboxes besides `sandbox_id`. Called in the
    transaction that gives the user the sandbox: on PostgreSQL it first takes the user's lock
    (held to that transaction's end), so the creates of one user through several replicas
    count one after another, each seeing the rows the others committed. SQLite has one
    process, whose own count (held per user in memory) is exact already."""
    try:
        await locks.lock_user(db, locks.USER_LIMIT, user_id)
    except locks.LockBusy as exc:
        raise Unavailable("another create of this user holds its count; try again") from exc
    held = await db.scalar(select(func.count()).select_from(Sandbox).where(
        Sandbox.user_id == user_id, Sandbox.id != sandbox_id,
        Sandbox.state.in_([s.value for s in LIVE])))
    if held >= cap:
        raise UserLimit(cap)
