"""The ledger (e2a/billing/ledger.py) on SQLite and on the suite's real PostgreSQL: concurrent
debits and purchases never lose or double an entry, the cached balance always equals the sum of
the ledger, and an entry with a ref is posted once however many times it is tried."""

from __future__ import annotations

import asyncio

import pytest

from e2a.billing import ledger
from e2a.billing.rates import MICRO
from e2a.store.models import Account, LedgerEntry
from tests.unit import stores

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request, tmp_path):
    engine, sessions, users = await stores.either(request.param, tmp_path, "ledger",
                                                  free_credits=100)
    yield sessions, users
    await engine.dispose()


async def sums(sessions, user):
    async with sessions() as db:
        return await ledger.balance(db, user), await ledger.ledger_sum(db, user)


async def test_a_new_account_gets_the_free_credits_once(store):
    sessions, (a, _) = store
    for _ in range(3):  # opened again: nothing more
        async with sessions() as db:
            await ledger.ensure_account(db, a, 100)
            await db.commit()
    assert await sums(sessions, a) == (100 * MICRO, 100 * MICRO)
    async with sessions() as db:
        rows = await ledger.entries(db, a, 10, 0)
    assert [(r.kind, r.ref) for r in rows] == [("grant", f"signup:{a}")]


async def test_fifty_concurrent_debits_and_purchases_add_up(store):
    sessions, (a, b) = store

    async def debit(i):
        async with sessions() as db:
            await ledger.post(db, a, -(1000 + i), "usage", f"usage {i}", ref=f"usage:x:{i}",
                              sandbox_id="sbx_x")
            await db.commit()

    async def purchase(i):
        # every purchase delivered twice at once, as a duplicated webhook would
        async with sessions() as db:
            await ledger.post(db, a, 500 * MICRO, "purchase", f"purchase {i % 25}",
                              ref=f"purchase:pur_{i % 25}")
            await db.commit()

    async def other(i):  # another user's entries in between change nothing of a's
        async with sessions() as db:
            await ledger.post(db, b, -7, "usage", "b's usage")
            await db.commit()

    jobs = [debit(i) for i in range(50)] + [purchase(i) for i in range(50)] + \
        [other(i) for i in range(10)]
    await asyncio.gather(*jobs)

    expected = 100 * MICRO - sum(1000 + i for i in range(50)) + 25 * 500 * MICRO
    assert await sums(sessions, a) == (expected, expected)
    assert await sums(sessions, b) == (100 * MICRO - 70, 100 * MICRO - 70)
    async with sessions() as db:
        rows = await ledger.entries(db, a, 1000, 0)
    assert sum(r.kind == "purchase" for r in rows) == 25
    assert sum(r.kind == "usage" for r in rows) == 50


async def test_a_ref_posts_once_and_the_second_try_changes_nothing(store):
    sessions, (a, _) = store
    async with sessions() as db:
        first = await ledger.post(db, a, 5 * MICRO, "purchase", "p", ref="purchase:pur_1")
        second = await ledger.post(db, a, 5 * MICRO, "purchase", "p", ref="purchase:pur_1")
        await db.commit()
    assert first and first.startswith("txn_") and second is None
    assert await sums(sessions, a) == (105 * MICRO, 105 * MICRO)


async def test_entries_are_newest_first_and_paged(store):
    sessions, (a, _) = store
    for i in range(5):
        async with sessions() as db:
            await ledger.post(db, a, -i, "usage", f"n{i}")
            await db.commit()
    async with sessions() as db:
        page1 = await ledger.entries(db, a, 3, 0)
        page2 = await ledger.entries(db, a, 3, 3)
    assert [r.description for r in page1] == ["n4", "n3", "n2"]
    assert [r.description for r in page2] == ["n1", "n0", "100 free credits for a new account"]


async def test_the_cache_changes_only_with_an_entry(store):
    sessions, (a, _) = store
    async with sessions() as db:
        await ledger.post(db, a, -3 * MICRO, "usage", "u")
        await db.rollback()  # an entry not committed moves no balance either
    async with sessions() as db:
        assert (await db.get(Account, a)).balance_micro == 100 * MICRO
        assert len((await db.execute(
            LedgerEntry.__table__.select().where(LedgerEntry.user_id == a))).all()) == 1
