"""The funds check at create (billing/service.py `funds_for`) over a real store: a create's minute
is held until its row is in, creates through two replicas on one PostgreSQL see each other's
holds (before, each replica held them in its own memory, and both passed a check the balance
paid once), and a hold left by a replica that died expires."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from e2a.billing.service import Billing, BillingError
from e2a.config import Settings
from e2a.sandboxes.records import Records, StoreCatalog, utcnow
from e2a.store.models import Account, CreditHold, Sandbox
from tests.unit import stores

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def billing(sessions, tmp_path) -> Billing:
    catalog = StoreCatalog(Records(sessions), lambda _id: None, "node")
    return Billing(sessions, Settings(data_dir=tmp_path), None, catalog, None)


async def balance_of(sessions, user, minutes: float, one: Billing) -> None:
    """The user's balance set to pay `minutes` first minutes of a standard sandbox."""
    await one.account(user)
    async with sessions() as db:
        await db.execute(update(Account).where(Account.user_id == user).values(
            balance_micro=int(minutes * one.first_minute("standard"))))
        await db.commit()


async def holds(sessions) -> int:
    async with sessions() as db:
        return await db.scalar(select(func.count()).select_from(CreditHold))


async def add_row(sessions, user) -> None:
    async with sessions() as db:
        db.add(Sandbox(id="sbx_funds", user_id=user, template="standard", state="running",
                       vcpu=1, cpu_fraction=0.5, memory_mib=512, internet=True, metadata_={},
                       env_vars={}, idle_timeout_seconds=60, max_lifetime_seconds=7200,
                       slot=None, envd_token="", created_at=utcnow(),
                       expires_at=utcnow() + timedelta(hours=2)))
        await db.commit()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_creates_minute_is_held_until_its_row_counts(backend, tmp_path):
    engine, sessions, (alice, _) = await stores.either(backend, tmp_path, "funds_hold")
    try:
        one = billing(sessions, tmp_path)
        await balance_of(sessions, alice, 1.5, one)
        async with one.funds_for(alice, "standard"):
            assert await holds(sessions) == 1
            with pytest.raises(BillingError) as refused:  # the first create's minute is held
                async with one.funds_for(alice, "standard"):
                    pass
            assert refused.value.status == 402
            await add_row(sessions, alice)  # the create's row goes in before its hold goes
        assert await holds(sessions) == 0
        with pytest.raises(BillingError):  # now the row counts
            async with one.funds_for(alice, "standard"):
                pass
    finally:
        await engine.dispose()


async def test_creates_through_two_replicas_see_each_others_holds(tmp_path):
    engine, sessions, (alice, bob) = await stores.either("postgresql", tmp_path, "funds_race")
    try:
        a, b = billing(sessions, tmp_path), billing(sessions, tmp_path)
        await balance_of(sessions, alice, 1.5, a)
        passed = []

        async def create(replica: Billing) -> None:
            try:
                async with replica.funds_for(alice, "standard"):
                    passed.append(replica)
                    await asyncio.sleep(0.3)  # the create under way, its row not in yet
            except BillingError as exc:
                assert exc.status == 402

        for _ in range(3):
            passed.clear()
            await asyncio.gather(*(create(r) for r in (a, b, a, b)))
            assert len(passed) == 1, f"{len(passed)} creates passed a check paid once"
        # another user's creates are not held up by alice's
        await balance_of(sessions, bob, 2.5, a)
        async with a.funds_for(bob, "standard"), b.funds_for(bob, "standard"):
            assert await holds(sessions) == 2
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_hold_left_by_a_dead_replica_expires(backend, tmp_path):
    engine, sessions, (alice, _) = await stores.either(backend, tmp_path, "funds_expiry")
    try:
        one = billing(sessions, tmp_path)
        await balance_of(sessions, alice, 1.5, one)
        minute = one.first_minute("standard")
        async with sessions() as db:
            db.add(CreditHold(id="hold_dead", user_id=alice, amount_micro=minute,
                              expires_at=utcnow() + timedelta(minutes=1)))
            await db.commit()
        with pytest.raises(BillingError):  # still held
            async with one.funds_for(alice, "standard"):
                pass
        async with sessions() as db:
            await db.execute(update(CreditHold).values(expires_at=utcnow() - timedelta(seconds=1)))
            await db.commit()
        async with one.funds_for(alice, "standard"):
            pass
        assert await holds(sessions) == 0  # the expired one went with the create's own
    finally:
        await engine.dispose()


async def test_the_check_needs_one_connection_of_the_pool(tmp_path):
    """One session throughout: a create never waits for a second connection while holding
    one (creates at once by as many users as the pool has connections would all wait)."""
    engine, sessions, (alice, _) = await stores.either("postgresql", tmp_path, "funds_pool")
    one_conn = create_async_engine(engine.url, pool_size=1, max_overflow=0, pool_timeout=3,
                                   connect_args={"server_settings": {
                                       "search_path": f"funds_pool_{worker()}"}})
    try:
        narrow = async_sessionmaker(one_conn, expire_on_commit=False)
        one = billing(narrow, tmp_path)
        await balance_of(narrow, alice, 2.5, one)
        await add_row(narrow, alice)
        async with one.funds_for(alice, "standard"):
            pass
        with pytest.raises(BillingError):  # the row and this hold: 2 minutes of 2.5
            async with one.funds_for(alice, "standard"):
                async with one.funds_for(alice, "standard"):
                    pass
    finally:
        await one_conn.dispose()
        await engine.dispose()


def worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "gw0")
