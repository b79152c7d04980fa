"""Metering (e2a/billing/metering.py) over a real store: meters follow the transition feed, a
sandbox is charged exactly for its running time (a warm one from its claim), and a tick cut off
by a crash, a restart of the metering, or a feed read twice never charges an interval twice or
skips one. The server-level tests (a real sandbox, a SIGKILL) are in tests/e2e/test_billing.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from e2a.billing import ledger
from e2a.billing.metering import Metering
from e2a.billing.rates import GIB, MICRO, Rates, compute_cost
from e2a.config import Settings
from e2a.sandboxes.records import Records, aware
from e2a.sandboxes.states import State
from e2a.store.models import LedgerEntry, Sandbox, SandboxEvent, SandboxMeter, Workspace
from tests.unit import stores

pytestmark = pytest.mark.anyio
T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=timezone.utc)
STANDARD = Rates(1400, 450, 10000).rate_num(500, 512)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgresql"])
async def env(request, tmp_path):
    engine, sessions, users = await stores.either(request.param, tmp_path, "metering",
                                                  free_credits=100)
    settings = Settings(data_dir=tmp_path)
    yield sessions, users, settings
    await engine.dispose()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def sandbox(sessions, sid, user, pooled=False):
    async with sessions() as db:
        db.add(Sandbox(id=sid, user_id=None if pooled else user, template="standard",
                       state="creating", vcpu=1, cpu_fraction=0.5, memory_mib=512,
                       internet=True, metadata_={}, env_vars={}, idle_timeout_seconds=60,
                       max_lifetime_seconds=7200, slot=None, envd_token="",
                       created_at=T0, expires_at=at(7200)))
        await db.commit()


async def event(sessions, sid, old, new, when, reason=None, user=None, **row):
    async with sessions() as db:
        db.add(SandboxEvent(sandbox_id=sid, from_state=old, to_state=new, reason=reason,
                            at=when))
        values = {"state": new, **row}
        if user:
            values["user_id"] = user
        await db.execute(Sandbox.__table__.update().where(Sandbox.__table__.c.id == sid)
                         .values(**values))
        await db.commit()


async def boot(sessions, sid, user, running_at, pooled=False):
    await sandbox(sessions, sid, user, pooled)
    await event(sessions, sid, None, "creating", at(0), "warm_pool" if pooled else "create")
    await event(sessions, sid, "creating", "configuring", at(0.1))
    await event(sessions, sid, "configuring", "booting", at(0.2))
    await event(sessions, sid, "booting", "running", running_at)


async def destroy(sessions, sid, stopping_at, destroyed_at):
    await event(sessions, sid, "running", "stopping", stopping_at)
    await event(sessions, sid, "stopping", "destroyed", destroyed_at, "deleted",
                destroyed_at=destroyed_at)


async def usage(sessions, user, sid=None):
    async with sessions() as db:
        q = select(LedgerEntry).where(LedgerEntry.user_id == user, LedgerEntry.kind == "usage")
        if sid:
            q = q.where(LedgerEntry.sandbox_id == sid)
        rows = (await db.execute(q)).scalars().all()
    return -sum(r.amount_micro for r in rows), rows


async def storage_rows(sessions, sid):
    async with sessions() as db:
        return (await db.execute(select(LedgerEntry).where(
            LedgerEntry.kind == "storage", LedgerEntry.sandbox_id == sid))).scalars().all()


async def consistent(sessions, user):
    async with sessions() as db:
        assert await ledger.balance(db, user) == await ledger.ledger_sum(db, user)


async def test_a_sandbox_is_charged_exactly_from_running_to_destroyed(env):
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await boot(sessions, "sbx_a", a, at(1))
    tick = await m.tick(now=at(5))
    assert tick.charged == {a}
    assert (await usage(sessions, a))[0] == compute_cost(4000, STANDARD)
    await destroy(sessions, "sbx_a", at(11), at(12.5))
    await m.tick(now=at(30))
    await m.tick(now=at(60))  # after the end: nothing more
    charged, rows = await usage(sessions, a)
    assert charged == compute_cost(11_500, STANDARD) == 10_637  # 11.5 s at 925 micro-credits/s
    assert sum(r.vcpu_seconds for r in rows) == pytest.approx(0.5 * 11.5)
    assert sum(r.gib_seconds for r in rows) == pytest.approx(0.5 * 11.5)
    assert all(r.sandbox_id == "sbx_a" and r.template == "standard" for r in rows)
    await consistent(sessions, a)


async def test_a_warm_sandbox_is_charged_from_its_claim(env):
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await boot(sessions, "sbx_w", a, at(1), pooled=True)
    await m.tick(now=at(50))  # in the pool: nobody's bill
    assert (await usage(sessions, a))[0] == 0
    await event(sessions, "sbx_w", "running", "running", at(100), "claimed", user=a)
    await destroy(sessions, "sbx_w", at(110), at(110.25))
    await m.tick(now=at(200))
    assert (await usage(sessions, a))[0] == compute_cost(10_250, STANDARD)


async def test_the_claim_read_with_the_boot_in_one_batch_still_starts_at_the_claim(env):
    sessions, (a, _), settings = env
    await boot(sessions, "sbx_w", a, at(1), pooled=True)
    await event(sessions, "sbx_w", "running", "running", at(100), "claimed", user=a)
    await destroy(sessions, "sbx_w", at(104), at(104))
    await Metering(sessions, settings, Rates.from_settings(settings)).tick(now=at(200))
    assert (await usage(sessions, a))[0] == compute_cost(4000, STANDARD)


async def test_a_tick_cut_off_halfway_charges_nothing_and_the_next_charges_all(env, monkeypatch):
    sessions, (a, b), settings = env
    await boot(sessions, "sbx_1", a, at(0))
    await boot(sessions, "sbx_2", b, at(0))
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await m.tick(now=at(10))
    real = ledger.post_many

    async def killed_before_commit(db, rows):
        await real(db, rows)  # everything written, then the process dies before its commit
        raise RuntimeError("killed mid-tick")

    monkeypatch.setattr(ledger, "post_many", killed_before_commit)
    with pytest.raises(RuntimeError):
        await m.tick(now=at(20))
    monkeypatch.setattr(ledger, "post_many", real)
    # a restarted server: a new Metering on the same store
    await Metering(sessions, settings, Rates.from_settings(settings)).tick(now=at(30))
    for user in (a, b):
        assert (await usage(sessions, user))[0] == compute_cost(30_000, STANDARD)
        await consistent(sessions, user)


async def test_events_read_again_while_settling_apply_once(env):
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await boot(sessions, "sbx_s", a, at(0))
    # the feed is read at times when these events are younger than the settling time, so the
    # cursor stays behind them and they are read again at every tick
    for t in (1, 2, 3):
        await m.tick(now=at(t))
    await destroy(sessions, "sbx_s", at(3.5), at(4))
    for t in (4.1, 4.2, 20, 30):
        await m.tick(now=at(t))
    charged, rows = await usage(sessions, a)
    assert charged == compute_cost(4000, STANDARD)
    assert len({r.ref for r in rows}) == len(rows)


async def test_a_tick_that_read_the_meter_open_while_its_destroy_committed_is_given_back(env):
    """A destroy's event is stamped before its transaction commits: a tick in between reads the
    meter still open and charges up to its own `now`, past the end. The end gives that back:
    the sandbox's usage is exactly its running time (CI once saw the overcharge under load)."""
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await boot(sessions, "sbx_r", a, at(0))
    await m.tick(now=at(5))  # the destroy below, stamped at 4 s, had not committed yet
    await destroy(sessions, "sbx_r", at(3.9), at(4))
    await m.tick(now=at(6))
    await m.tick(now=at(30))  # and nothing more after that
    charged, rows = await usage(sessions, a, "sbx_r")
    assert charged == compute_cost(4000, STANDARD)
    assert sum(r.vcpu_seconds for r in rows) == pytest.approx(0.5 * 4)
    assert len({r.ref for r in rows}) == len(rows)
    await consistent(sessions, a)


async def test_a_destroy_seen_through_its_row_or_its_event_ends_at_one_time(env):
    """A tick reads the feed, then the meters: a destroy that commits between the two is seen
    through its row (the meter closed at `destroyed_at`, its event then ignored); one that
    commits before, through its event. Both carry one time, so either way is exact (they
    were a few ms apart: undercharged, CI's billing test could fail that way too)."""
    sessions, (a, _), settings = env
    await boot(sessions, "sbx_t", a, at(0))
    await Records(sessions).transition("sbx_t", State.RUNNING, State.DESTROYED, "deleted",
                                       destroyed_at=at(4), end_reason="deleted")
    async with sessions() as db:
        row = await db.get(Sandbox, "sbx_t")
        [end] = (await db.execute(select(SandboxEvent.at).where(
            SandboxEvent.sandbox_id == "sbx_t", SandboxEvent.to_state == "destroyed"))).scalars()
    assert aware(end) == aware(row.destroyed_at) == at(4)
    await Metering(sessions, settings, Rates.from_settings(settings)).tick(now=at(30))
    assert (await usage(sessions, a, "sbx_t"))[0] == compute_cost(4000, STANDARD)


async def test_a_destroy_committed_after_the_ticks_now_ends_at_its_own_time(env):
    """A tick takes its `now`, then reads the feed and the meters: a destroy stamped after
    that `now` and committed between the two reads is seen through its row alone. The meter
    stays open until a tick whose `now` has passed the end (it was closed at the tick's `now`,
    its event then ignored: a few ms undercharged, CI's billing test failed that way)."""
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await boot(sessions, "sbx_l", a, at(0))
    async with sessions() as db:  # the row committed; its event not yet read by this tick
        await db.execute(Sandbox.__table__.update().where(Sandbox.__table__.c.id == "sbx_l")
                         .values(state="destroyed", destroyed_at=at(4)))
        await db.commit()
    await m.tick(now=at(3.995))
    async with sessions() as db:
        db.add(SandboxEvent(sandbox_id="sbx_l", from_state="stopping", to_state="destroyed",
                            reason="deleted", at=at(4)))
        await db.commit()
    await m.tick(now=at(30))
    charged, rows = await usage(sessions, a, "sbx_l")
    assert charged == compute_cost(4000, STANDARD)
    assert len({r.ref for r in rows}) == len(rows)
    await consistent(sessions, a)


async def test_a_total_charged_again_after_a_give_back_is_a_new_row(env):
    """Charged to 5 s, given back to 4 s at a pause, resumed: the charge up to 5 s again is a
    new ledger row (a repeated ref fails the whole tick, every tick after)."""
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await boot(sessions, "sbx_g", a, at(0))
    await m.tick(now=at(5))
    await event(sessions, "sbx_g", "running", "paused", at(4))
    await m.tick(now=at(6))
    await event(sessions, "sbx_g", "paused", "running", at(10))
    await m.tick(now=at(11))  # 4 s + 1 s: 5 s again
    await destroy(sessions, "sbx_g", at(11), at(11))
    await m.tick(now=at(30))
    charged, rows = await usage(sessions, a, "sbx_g")
    assert charged == compute_cost(5000, STANDARD)
    assert len({r.ref for r in rows}) == len(rows) >= 3


async def test_a_pause_and_a_resume_committed_after_a_tick_read_them_settle_at_their_times(env):
    """As above for a pause (its compute) and a resume (its paused disk's storage)."""
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await boot(sessions, "sbx_q", a, at(0))
    await m.tick(now=at(5))
    async with sessions() as db:  # as the manager writes a pause
        db.add(SandboxEvent(sandbox_id="sbx_q", from_state="running", to_state="paused",
                            at=at(4), disk_bytes=GIB))
        await db.commit()
    await m.tick(now=at(60))  # paused: charged for the 4 s it ran, not the 5 the tick saw
    assert (await usage(sessions, a, "sbx_q"))[0] == compute_cost(4000, STANDARD)
    await m.tick(now=at(4 + 5400))  # 1.5 GiB-hours paused so far
    assert -sum(r.amount_micro for r in await storage_rows(sessions, "sbx_q")) == 15_000
    await event(sessions, "sbx_q", "paused", "running", at(4 + 3600))  # 1 GiB-hour in all
    await m.tick(now=at(4 + 5401))
    rows = await storage_rows(sessions, "sbx_q")
    assert -sum(r.amount_micro for r in rows) == 10_000
    assert sum(r.gib_hours for r in rows) == pytest.approx(1.0)
    await destroy(sessions, "sbx_q", at(3606), at(3606))
    await m.tick(now=at(9000))
    assert (await usage(sessions, a, "sbx_q"))[0] == compute_cost(6000, STANDARD)
    await consistent(sessions, a)


async def test_a_row_destroyed_without_its_event_closes_its_meter(env):
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await boot(sessions, "sbx_c", a, at(0))
    await m.tick(now=at(5))
    # as records.mark_unknown_destroyed does after a crash: the row, no event
    async with sessions() as db:
        await db.execute(Sandbox.__table__.update().values(state="destroyed",
                                                           destroyed_at=at(8)))
        await db.commit()
    await m.tick(now=at(60))
    await m.tick(now=at(90))
    assert (await usage(sessions, a))[0] == compute_cost(8000, STANDARD)
    async with sessions() as db:
        assert (await db.get(SandboxMeter, "sbx_c")).finished


async def test_paused_time_is_not_charged_for_compute(env):
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await boot(sessions, "sbx_p", a, at(0))
    await event(sessions, "sbx_p", "running", "paused", at(10))
    await m.tick(now=at(50))
    await event(sessions, "sbx_p", "paused", "running", at(100))
    await destroy(sessions, "sbx_p", at(105), at(105))
    await m.tick(now=at(200))
    assert (await usage(sessions, a))[0] == compute_cost(15_000, STANDARD)


async def test_a_paused_sandbox_is_charged_storage_for_the_disk_each_pause_held(env):
    """Two pauses of different sizes, a tick inside the second, the sandbox destroyed while
    paused: storage for exactly 1 GiB × 1 h + 3 GiB × 2 h, and compute for running time only."""
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await boot(sessions, "sbx_d", a, at(0))
    async with sessions() as db:  # the two pauses, as the manager writes them
        db.add_all([
            SandboxEvent(sandbox_id="sbx_d", from_state="running", to_state="paused",
                         at=at(10), disk_bytes=GIB),
            SandboxEvent(sandbox_id="sbx_d", from_state="paused", to_state="running",
                         at=at(3610)),
            SandboxEvent(sandbox_id="sbx_d", from_state="running", to_state="paused",
                         at=at(3620), disk_bytes=3 * GIB)])
        await db.commit()
    await m.tick(now=at(3620 + 3600))  # one hour into the second pause: charged so far
    first = -sum(r.amount_micro for r in await storage_rows(sessions, "sbx_d"))
    assert first == (1 + 3) * 10_000
    await event(sessions, "sbx_d", "paused", "stopping", at(3620 + 7200))
    await event(sessions, "sbx_d", "stopping", "destroyed", at(3620 + 7200), "deleted",
                destroyed_at=at(3620 + 7200))
    await m.tick(now=at(20_000))
    await m.tick(now=at(30_000))  # nothing more after the end
    rows = await storage_rows(sessions, "sbx_d")
    assert -sum(r.amount_micro for r in rows) == (1 + 6) * 10_000
    assert sum(r.gib_hours for r in rows) == pytest.approx(7.0)
    assert (await usage(sessions, a))[0] == compute_cost(20_000, STANDARD)  # 10 s + 10 s


async def test_a_small_paused_disk_is_charged_once_it_is_worth_a_micro_credit(env):
    """2 MiB paused: no rows of 0 every tick, one row when a micro-credit is due, covering the
    whole time (its GiB-hours add up)."""
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    await boot(sessions, "sbx_s", a, at(0))
    async with sessions() as db:
        db.add(SandboxEvent(sandbox_id="sbx_s", from_state="running", to_state="paused",
                            at=at(10), disk_bytes=2 << 20))
        await db.commit()
    for t in range(11, 200, 30):  # ~190 s: under one micro-credit (2 MiB × 194 s)
        await m.tick(now=at(t))
    assert await storage_rows(sessions, "sbx_s") == []
    await m.tick(now=at(10 + 400))
    rows = await storage_rows(sessions, "sbx_s")
    assert [r.amount_micro for r in rows] == [-2]  # 2 MiB × 400 s = 2.07 micro-credits
    assert rows[0].gib_hours == pytest.approx(2 / 1024 * 400 / 3600)


async def test_storage_is_charged_per_gib_hour_of_measured_size(env):
    sessions, (a, _), settings = env
    m = Metering(sessions, settings, Rates.from_settings(settings))
    async with sessions() as db:
        db.add(Workspace(id="wsp_1", user_id=a, end_user_id="", app_id="app", capset_id="c",
                         created_at=T0, last_used_at=T0, bytes_used=2 * GIB, file_count=1))
        await db.commit()
    assert await m.charge_storage(now=at(0)) == set()  # its meter starts here
    assert await m.charge_storage(now=at(1800)) == {a}
    assert await m.charge_storage(now=at(3600)) == {a}
    async with sessions() as db:
        rows = (await db.execute(select(LedgerEntry).where(LedgerEntry.kind == "storage"))
                ).scalars().all()
    # 2 GiB for an hour at 0.01 credits per GiB-hour
    assert -sum(r.amount_micro for r in rows) == 2 * 10_000
    assert sum(r.gib_hours for r in rows) == pytest.approx(2.0)
    await consistent(sessions, a)
    async with sessions() as db:
        assert await ledger.balance(db, a) == 100 * MICRO - 20_000
