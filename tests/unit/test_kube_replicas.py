"""Leader election and replica liveness on the suite's PostgreSQL (e2a/kube/replicas.py): one
leader at a time, a successor once it goes, and a replica counted gone only after its lock
stayed free for the grace time (a connection that blinks is not a death); and the per-user
limit exact across replicas."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from e2a.ids import new_id
from e2a.kube import replicas
from e2a.kube.replicas import Replica
from e2a.sandboxes.host import UserLimit
from e2a.sandboxes.records import Records
from e2a.sandboxes.states import State
from e2a.store.models import Sandbox
from tests.unit.stores import either

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def engine():
    """A database of its own, migrated (a replica whose key changes moves the rows of the
    store's tables; the shared one's public schema may be any test's, or being dropped)."""
    from e2a.store import db as store
    from tests.kube.cluster import pg_database
    if not os.environ.get("E2A_TEST_PG_URL"):
        pytest.skip("E2A_TEST_PG_URL not set (make test starts PostgreSQL and sets it)")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    engine = create_async_engine(pg_database(f"e2a_replicas_{worker}"))
    await store.migrate(engine)
    yield engine
    await engine.dispose()


async def test_one_leader_and_a_successor_when_it_goes(engine, monkeypatch):
    monkeypatch.setattr(replicas, "TRY_EVERY", 0.1)
    instance = "t" + secrets.token_hex(4)  # a leader lock of this test's own
    led: list[str] = []

    async def lead(name):
        led.append(name)
    a, b = Replica(engine, instance), Replica(engine, instance)
    await a.start(lambda: lead("a"))
    await b.start(lambda: lead("b"))
    try:
        await asyncio.sleep(0.5)
        assert (a.leading, b.leading, led) == (True, False, ["a"])
        assert not await b.gone(a.key) and not await a.gone(b.key)
        await a.stop()  # its connection, and both its locks, go
        deadline = time.monotonic() + 5
        while not b.leading and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert b.leading and led == ["a", "b"]
        # gone only once free for the grace time
        assert not await b.gone(a.key)
        await asyncio.sleep(replicas.GRACE + 0.1)
        assert await b.gone(a.key)
    finally:
        await a.stop()
        await b.stop()


async def test_a_replica_whose_key_is_held_takes_another(engine):
    instance = "t" + secrets.token_hex(4)
    a = Replica(engine, instance)
    await a.start(lambda: asyncio.sleep(0))
    b = Replica(engine, instance)
    b.key = a.key  # as if a session the server has not yet seen die still held b's key
    await b.start(lambda: asyncio.sleep(0))
    try:
        assert b.key != a.key
        assert not await a.gone(b.key) and not await b.gone(a.key)
    finally:
        await a.stop()
        await b.stop()


async def test_a_lock_seen_free_long_ago_must_stay_free_for_the_grace_again(engine, monkeypatch):
    """A key seen free once, then not looked at for long, is not gone at the next look: the
    grace counts from looks close enough together."""
    monkeypatch.setattr(replicas, "GRACE", 0.3)
    monkeypatch.setattr(replicas, "LOOKS_APART", 0.5)
    a = Replica(engine, "t" + secrets.token_hex(4))
    await a.start(lambda: asyncio.sleep(0))
    try:
        nobodys = secrets.randbits(62) + 1
        assert not await a.gone(nobodys)   # free from now on
        await asyncio.sleep(1.0)           # a look that long ago proves nothing now
        assert not await a.gone(nobodys)
        await asyncio.sleep(0.4)
        assert await a.gone(nobodys)
    finally:
        await a.stop()


async def test_alive_now_is_a_lock_held_at_this_moment(engine):
    """What a follow-up is passed on by: no grace, a replica that may be gone is gone (its
    address may be any pod's by now)."""
    a, b = Replica(engine, "t" + secrets.token_hex(4)), Replica(engine, "t" + secrets.token_hex(4))
    await a.start(lambda: asyncio.sleep(0))
    await b.start(lambda: asyncio.sleep(0))
    try:
        assert await b.alive_now(a.key) and await a.alive_now(b.key)
        assert not await b.alive_now(secrets.randbits(62) + 1)  # nobody's
        assert not await a.alive_now(a.key)  # itself: not another replica
        await a.stop()
        assert not await b.alive_now(a.key)  # at once, where gone() would wait for the grace
        assert not await b.gone(a.key)
    finally:
        await a.stop()
        await b.stop()


async def test_sqlite_is_one_process_that_leads(tmp_path):
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'e2a.db'}")
    r = Replica(engine, "e2a")
    led = []

    async def lead():
        led.append(1)
    await r.start(lead)
    assert r.leading and led == [1]
    assert await r.gone(r.key + 1) and not await r.gone(r.key)
    await r.stop()
    await engine.dispose()


# ---- the per-user limit across replicas (records.within_user_limit) -------------------------

def _row(user_id: str | None, state: State = State.CREATING) -> Sandbox:
    now = datetime.now(timezone.utc)
    return Sandbox(id=new_id("sbx"), user_id=user_id, template="standard", state=state.value,
                   vcpu=1, cpu_fraction=1.0, memory_mib=512, internet=False, metadata_={},
                   env_vars={}, idle_timeout_seconds=60, max_lifetime_seconds=600, slot=None,
                   envd_token="", created_at=now, expires_at=now + timedelta(minutes=10))


async def _at_once(*calls) -> list:
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_a_users_limit_holds_for_creates_racing_through_replicas(tmp_path):
    """Ten creates of one user at once, through two replicas (two Records, each its own
    connections): exactly the limit get a row, the others UserLimit; another user is not
    held up by it."""
    engine, sessions, (alice, bob) = await either("postgresql", tmp_path, "user_limit")
    try:
        a, b = Records(sessions), Records(sessions)
        got = await _at_once(*[(a if i % 2 else b).insert(_row(alice), "create", user_cap=3)
                               for i in range(10)])
        assert sum(g is None for g in got) == 3, got
        assert all(g is None or isinstance(g, UserLimit) for g in got), got
        async with sessions() as db:
            assert await db.scalar(select(func.count()).select_from(Sandbox).where(
                Sandbox.user_id == alice)) == 3
        await a.insert(_row(bob), "create", user_cap=3)
    finally:
        await engine.dispose()


async def test_a_users_limit_holds_for_warm_claims_racing_through_replicas(tmp_path):
    """The same for claims of pooled sandboxes: a user with one sandbox and a limit of 3 gets
    two of six pooled ones claimed at once, and the other four stay in the pool."""
    engine, sessions, (alice, _) = await either("postgresql", tmp_path, "user_limit_claims")
    try:
        a, b = Records(sessions), Records(sessions)
        await a.insert(_row(alice, State.RUNNING), "create", user_cap=3)
        pooled = [_row(None, State.RUNNING) for _ in range(6)]
        for row in pooled:
            await a.insert(row, "warm_pool")
        got = await _at_once(*[(a if i % 2 else b).claim(row.id, alice, {}, user_cap=3)
                               for i, row in enumerate(pooled)])
        assert got.count(True) == 2 and sum(isinstance(g, UserLimit) for g in got) == 4, got
        async with sessions() as db:
            assert await db.scalar(select(func.count()).select_from(Sandbox).where(
                Sandbox.user_id.is_(None))) == 4
    finally:
        await engine.dispose()


async def test_a_replica_that_must_take_a_new_key_moves_its_rows_to_it():
    """A replica whose lock connection dropped while a session the server has not yet seen
    die still holds its key goes on under a new key; the rows it works on (a create, its agent,
    a task, a chat session) move to the new key at once, or they would look a dead replica's once the old is free."""
    from e2a import auth
    from e2a.store import db as store
    from e2a.store.models import ChatSession, Task
    from tests.kube.cluster import pg_database
    if not os.environ.get("E2A_TEST_PG_URL"):
        pytest.skip("E2A_TEST_PG_URL not set (make test starts PostgreSQL and sets it)")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    engine = create_async_engine(pg_database(f"e2a_restamp_{worker}"))
    await store.migrate(engine)
    sessions = store.sessionmaker(engine)
    a = Replica(engine, "t" + secrets.token_hex(4))
    await a.start(lambda: asyncio.sleep(0))
    ghost = None
    try:
        old = a.key
        async with sessions() as db:
            user = (await auth.create_user(db, "restamp@example.com", 0)).id
            await db.commit()
        row = _row(user)
        row.replica = row.agent_replica = old
        await Records(sessions).insert(row, "create")
        async with sessions() as db:
            db.add(Task(id=new_id("tsk"), sandbox_id=row.id, user_id=user, agent="gemini-cli",
                        vendor="google", prompt="p", state="running",
                        started_at=datetime.now(timezone.utc), replica=old))
            now = datetime.now(timezone.utc)
            db.add(ChatSession(id=new_id("ses"), user_id=user, end_user_id="eu", app_id="a",
                               set_id="s", capability_sets=[], agent="e2a", agent_version="1",
                               template="standard", vendor="anthropic", secrets=[],
                               sandbox_id=row.id, state="active", created_at=now,
                               expires_at=now + timedelta(hours=1), replica=old))
            await db.commit()
        await a._close()  # its lock connection drops...
        ghost = await a.engine.connect()  # ...and a session still holds its key
        assert await ghost.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": old})
        await a._connect()
        assert a.key != old
        async with sessions() as db:
            assert (await db.execute(select(Sandbox.replica, Sandbox.agent_replica).where(
                Sandbox.id == row.id))).one() == (a.key, a.key)
            assert await db.scalar(select(Task.replica).where(Task.sandbox_id == row.id)) == a.key
            assert await db.scalar(select(ChatSession.replica).where(
                ChatSession.sandbox_id == row.id)) == a.key
    finally:
        if ghost is not None:
            await ghost.close()
        await a.stop()
        await engine.dispose()
