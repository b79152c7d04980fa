"""Metering: running sandboxes and stored workspaces charged to their owners' ledgers.

Compute follows the sandbox core's transition feed (`sandbox_events`): a sandbox's meter opens
when it starts running for its user (its `running` transition, or the `claimed` event of a warm
one: a sandbox waiting in the pool is nobody's bill), pauses and resumes with it, and closes at
`destroyed`. Each tick charges every meter for its running time so far: the charge is the cost of
the whole time minus what was charged before (billing/rates.py), in the same transaction as the
meter's new mark, so a tick cut off by a crash or a SIGKILL leaves nothing half done, and the
next one charges exactly what is owed: no interval twice, none skipped.

Storage is charged every `storage_metering_interval` from each workspace's measured size. A
paused sandbox's disk (its writable layer and checkpoint) is storage too, charged at the same
rate by the compute ticks, for the size each pause held (on its `paused` event).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Awaitable, Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from e2a.billing import ledger
from e2a.billing.rates import GIB, Rates, compute_cost, vcpu_milli
from e2a.sandboxes.records import aware, utcnow
from e2a.store.models import (Account, MeteringCursor, Sandbox, SandboxEvent, SandboxMeter, StorageMeter,
                              Workspace)

log = logging.getLogger("e2a.billing")

# Events are read by id. On PostgreSQL an id is taken at insert and a later id can commit first,
# so the cursor only passes events older than this; younger ones are read again next tick (each
# meter remembers the last event it applied, so a second reading changes nothing).
SETTLE = timedelta(seconds=5)
BATCH = 2000


def ms_between(a: datetime, b: datetime) -> int:
    return max(0, int((aware(b) - aware(a)) / timedelta(milliseconds=1)))


@dataclass
class Tick:
    """What one tick did: the users whose balance it moved, and the ledger rows it posts."""

    charged: set[str] = field(default_factory=set)
    entries: list[dict] = field(default_factory=list)


class Metering:
    def __init__(self, sessions: async_sessionmaker, settings, rates: Rates,
                 on_charged: Callable[[set[str]], Awaitable[None]] | None = None,
                 count_storage: Callable[[], Awaitable[None]] | None = None):
        self.db = sessions
        self.settings = settings
        self.rates = rates
        self.on_charged = on_charged
        # counts again what was written to workspaces outside a sandbox (presigned PUTs)
        self.count_storage = count_storage
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one tick at a time in this process
        self._storage_due = 0.0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="metering")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        # A last tick, so that what ran until now is on the ledger before the server goes.
        try:
            await self.tick()
        except Exception as exc:
            log.warning("metering: the last tick before stopping failed: %s", exc)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._storage_due = loop.time() + self.settings.storage_metering_interval
        while True:
            await asyncio.sleep(self.settings.metering_interval)
            try:
                tick = await self.tick()
                if loop.time() >= self._storage_due:
                    self._storage_due = loop.time() + self.settings.storage_metering_interval
                    tick.charged |= await self.charge_storage()
                if tick.charged and self.on_charged:
                    await self.on_charged(tick.charged)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("metering: tick failed (retried next tick)")

    # ---- compute ----------------------------------------------------------------------------

    async def tick(self, now: datetime | None = None) -> Tick:
        """Apply the feed's new events to the meters, then charge every meter up to `now`: one
        transaction, whose writes are a few statements however many sandboxes run (the meters'
        marks in one executemany, the ledger rows in one insert, one balance update per user)."""
        async with self._lock:
            now = now or utcnow()
            tick = Tick()
            async with self.db() as db:
                cursor = await self._lock_billing(db)
                while await self._apply_events(db, cursor, now, tick):
                    pass
                await self._charge_open(db, now, tick)
                await db.flush()
                await ledger.post_many(db, tick.entries)
                await db.commit()
            return tick

    @staticmethod
    async def _lock_billing(db: AsyncSession) -> MeteringCursor:
        """The feed's cursor, locked for this transaction: tickers in other processes (replicas
        on one PostgreSQL) wait here until this one commits, so nothing is charged twice
        (SQLite has one writer anyway)."""
        cursor = await db.scalar(select(MeteringCursor).where(
            MeteringCursor.name == "sandbox_events").with_for_update())
        if cursor is None:
            cursor = MeteringCursor(name="sandbox_events", value=0)
            db.add(cursor)
            await db.flush()
        return cursor

    async def _apply_events(self, db: AsyncSession, cursor: MeteringCursor, now: datetime,
                            tick: Tick) -> bool:
        """One batch of the feed; True when there may be more."""
        rows = (await db.execute(
            select(SandboxEvent, Sandbox).join(Sandbox, Sandbox.id == SandboxEvent.sandbox_id)
            .where(SandboxEvent.id > cursor.value).order_by(SandboxEvent.id).limit(BATCH))).all()
        if not rows:
            return False
        ids = {sb.id for _, sb in rows}
        pooled = await self._pooled(db, {sb.id for ev, sb in rows if ev.to_state == "running"})
        meters = {m.sandbox_id: m for m in (await db.execute(
            select(SandboxMeter).where(SandboxMeter.sandbox_id.in_(ids)))).scalars()}
        users = {sb.user_id for _, sb in rows if sb.user_id}
        accounts = set((await db.execute(
            select(Account.user_id).where(Account.user_id.in_(users)))).scalars())
        settled = cursor.value
        contiguous = True
        for ev, sb in rows:
            meter = self._apply(ev, sb, sb.id in pooled, meters.get(sb.id), tick)
            if meter is not None and sb.id not in meters:
                meters[sb.id] = meter
                db.add(meter)
                if meter.user_id not in accounts:  # a user from before accounts existed
                    await ledger.ensure_account(db, meter.user_id, self.settings.free_credits)
                    accounts.add(meter.user_id)
            if contiguous and aware(ev.at) <= now - SETTLE:
                settled = ev.id
            else:
                contiguous = False
        cursor.value = settled
        return len(rows) == BATCH and settled == rows[-1][0].id

    @staticmethod
    async def _pooled(db: AsyncSession, sandbox_ids: set[str]) -> set[str]:
        """Those of the sandboxes that were started for the warm pool (their first event)."""
        if not sandbox_ids:
            return set()
        q = select(SandboxEvent.sandbox_id).where(
            SandboxEvent.sandbox_id.in_(sandbox_ids), SandboxEvent.from_state.is_(None),
            SandboxEvent.reason == "warm_pool")
        return set((await db.execute(q)).scalars().all())

    def _apply(self, ev: SandboxEvent, sb: Sandbox, pooled: bool, meter: SandboxMeter | None,
               tick: Tick) -> SandboxMeter | None:
        """One event applied to the sandbox's meter; returns the meter (a new one, unsaved,
        when this event starts it)."""
        if meter is not None and ev.id <= meter.last_event_id:
            return meter  # applied before (read again while the cursor waited for older ids)
        starts = ev.reason == "claimed" or (
            ev.to_state == "running" and ev.from_state == "booting" and not pooled)
        resumes = ev.to_state == "running" and ev.from_state == "paused"
        if meter is None:
            if not starts or sb.user_id is None:
                return None
            milli = vcpu_milli(sb.vcpu, sb.cpu_fraction)
            return SandboxMeter(
                sandbox_id=sb.id, user_id=sb.user_id, template=sb.template, vcpu_milli=milli,
                memory_mib=sb.memory_mib, rate_num=self.rates.rate_num(milli, sb.memory_mib),
                open_since=aware(ev.at), closed_ms=0, billed_ms=0, charged_micro=0,
                last_event_id=ev.id, finished=False, paused_since=None, paused_bytes=0,
                paused_byte_s=0, storage_billed_byte_s=0, storage_charged_micro=0)
        meter.last_event_id = ev.id
        if meter.finished:
            return meter
        if (starts or resumes) and meter.open_since is None:
            meter.open_since = aware(ev.at)
        elif ev.to_state in ("paused", "destroyed") and meter.open_since is not None:
            meter.closed_ms += ms_between(meter.open_since, ev.at)
            meter.open_since = None
        if ev.from_state == "paused" and meter.paused_since is not None:
            self._unpause(meter, ev.at)
        if ev.to_state == "paused":
            meter.paused_since, meter.paused_bytes = aware(ev.at), ev.disk_bytes or 0
        if ev.to_state == "destroyed":
            meter.finished = True
            self._unpause(meter, ev.at)
            self._charge(meter, meter.closed_ms, tick, settled=True)
            self._charge_paused(meter, meter.paused_byte_s, tick, settled=True)
        return meter

    @staticmethod
    def _unpause(meter: SandboxMeter, at: datetime) -> None:
        if meter.paused_since is not None:
            meter.paused_byte_s += meter.paused_bytes * ms_between(meter.paused_since, at) // 1000
            meter.paused_since, meter.paused_bytes = None, 0

    async def _charge_open(self, db: AsyncSession, now: datetime, tick: Tick) -> None:
        meters = (await db.execute(
            select(SandboxMeter, Sandbox.state, Sandbox.destroyed_at)
            .join(Sandbox, Sandbox.id == SandboxMeter.sandbox_id)
            .where(SandboxMeter.finished.is_(False)))).all()
        for meter, state, destroyed_at in meters:
            if state == "destroyed" and (meter.open_since or meter.paused_since) is not None \
                    and (destroyed_at is None or aware(destroyed_at) <= now):
                # Destroyed without a `destroyed` event (a row marked after a crash, or a
                # destroy that committed after this tick read the feed): closed when its row
                # says it ended. A row that ended after this tick's `now` is left open: the
                # next tick closes it at its time (closed at `now`, it was undercharged).
                end = aware(destroyed_at) or now
                if meter.open_since is not None:
                    meter.closed_ms += ms_between(meter.open_since, end)
                self._unpause(meter, end)
                meter.open_since, meter.finished = None, True
            # A meter not running (paused, or closed just now) knows its running time exactly.
            total = meter.closed_ms + (ms_between(meter.open_since, now)
                                       if meter.open_since is not None else 0)
            self._charge(meter, total, tick, settled=meter.open_since is None)
            paused = meter.paused_byte_s + (
                meter.paused_bytes * ms_between(meter.paused_since, now) // 1000
                if meter.paused_since is not None else 0)
            self._charge_paused(meter, paused, tick, settled=meter.paused_since is None)

    @staticmethod
    def _charge(meter: SandboxMeter, total_ms: int, tick: Tick, settled: bool = False) -> None:
        """Charge the meter up to `total_ms` of running, if that is more than it has paid:
        its new mark (written with the tick) and the ledger row (posted with the tick).

        `settled`: `total_ms` is exact (the sandbox is paused or destroyed), and what was
        charged past it is given back. An event is stamped before its transaction commits, so
        a tick in between reads the meter still open and charges up to its own `now`, beyond
        the pause or destroy that ended the running.

        A ref names the last event applied: between two events the totals only grow (a
        give-back comes only with a pause or an end), so a total charged again after a
        give-back never repeats an earlier row's ref, which would fail every tick after."""
        done_ms = meter.billed_ms
        if total_ms == done_ms or (total_ms < done_ms and not settled):
            return
        cost = compute_cost(total_ms, meter.rate_num)
        amount = cost - meter.charged_micro
        delta_ms = total_ms - done_ms
        meter.billed_ms, meter.charged_micro = total_ms, cost
        if amount == 0 and delta_ms < 0:
            return  # less than a micro-credit to give back
        vcpu = meter.vcpu_milli / 1000
        ref = f"usage:{meter.sandbox_id}:{meter.last_event_id}:"
        if delta_ms > 0:
            what = f"{delta_ms / 1000:.3f} s at {vcpu:g} vCPU and {meter.memory_mib} MiB"
            ref += str(total_ms)
        else:
            what = f"{-delta_ms / 1000:.3f} s charged after it stopped running, given back"
            ref += f"{done_ms}>{total_ms}"
        tick.entries.append(ledger.entry(
            meter.user_id, -amount, "usage", f"{meter.template} sandbox {meter.sandbox_id}: "
            f"{what}", ref=ref, sandbox_id=meter.sandbox_id, template=meter.template,
            vcpu_seconds=vcpu * delta_ms / 1000,
            gib_seconds=meter.memory_mib / 1024 * delta_ms / 1000))
        tick.charged.add(meter.user_id)

    def _charge_paused(self, meter: SandboxMeter, byte_s: int, tick: Tick,
                       settled: bool = False) -> None:
        """Charge the sandbox's paused disk up to `byte_s` byte-seconds, as `_charge` does
        (`settled` too: a resume or destroy that committed late). A share worth less than a
        micro-credit waits for the next tick (an idle paused sandbox's 2 MiB come to one
        micro-credit every ~3 minutes): no rows of 0."""
        done = meter.storage_billed_byte_s
        if byte_s == done or (byte_s < done and not settled):
            return
        cost = self.rates.storage_cost(byte_s)
        amount = cost - meter.storage_charged_micro
        forward = byte_s > done
        if (forward and amount <= 0) or (not forward and amount >= 0):
            return  # not a micro-credit's worth to charge or give back yet
        meter.storage_billed_byte_s, meter.storage_charged_micro = byte_s, cost
        gib_hours = (byte_s - done) / GIB / 3600
        ref = f"paused:{meter.sandbox_id}:{meter.last_event_id}:"  # as `_charge`'s
        if forward:
            what = f"{gib_hours:.6f} GiB-hours on disk"
            ref += str(byte_s)
        else:
            what = f"{-gib_hours:.6f} GiB-hours charged after its resume or end, given back"
            ref += f"{done}>{byte_s}"
        tick.entries.append(ledger.entry(
            meter.user_id, -amount, "storage",
            f"paused {meter.template} sandbox {meter.sandbox_id}: {what}", ref=ref,
            sandbox_id=meter.sandbox_id, template=meter.template, gib_hours=gib_hours))
        tick.charged.add(meter.user_id)

    # ---- storage ----------------------------------------------------------------------------

    async def charge_storage(self, now: datetime | None = None) -> set[str]:
        """Charge every workspace for its measured size since its last charge (one transaction;
        its writes batched as a compute tick's are)."""
        if self.count_storage is not None:
            try:
                await self.count_storage()
            except Exception as exc:  # charged from the last counts instead
                log.warning("metering: counting workspaces failed: %s", exc)
        now = now or utcnow()
        tick = Tick()
        async with self._lock:
            async with self.db() as db:
                await self._lock_billing(db)
                rows = (await db.execute(
                    select(Workspace, StorageMeter)
                    .join(StorageMeter, StorageMeter.workspace_id == Workspace.id, isouter=True)
                )).all()
                for ws, meter in rows:
                    if meter is None:
                        await ledger.ensure_account(db, ws.user_id, self.settings.free_credits)
                        db.add(StorageMeter(workspace_id=ws.id, user_id=ws.user_id,
                                            metered_at=now, byte_seconds=0, charged_micro=0))
                        continue
                    ms = ms_between(meter.metered_at, now)
                    if ms <= 0:
                        continue
                    size = ws.bytes_used or 0
                    meter.byte_seconds += size * ms // 1000
                    cost = self.rates.storage_cost(meter.byte_seconds)
                    amount = cost - meter.charged_micro
                    meter.metered_at, meter.charged_micro = now, cost
                    if size:
                        tick.entries.append(ledger.entry(
                            ws.user_id, -amount, "storage",
                            f"workspace {ws.id}: {size / GIB:.6f} GiB stored for "
                            f"{ms / 1000:.3f} s", ref=f"storage:{ws.id}:{int(now.timestamp() * 1000)}",
                            workspace_id=ws.id, gib_hours=size / GIB * ms / 3_600_000))
                        tick.charged.add(ws.user_id)
                await db.flush()
                await ledger.post_many(db, tick.entries)
                await db.commit()
        return tick.charged
