"""Leader election and replica liveness on the suite's PostgreSQL (e2a/kube/replicas.py): one
leader at a time, a successor once it goes, and a replica counted gone only after its lock
stayed free for the grace time (a connection that blinks is not a death)."""

from __future__ import annotations

import asyncio
import os
import secrets
import time

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from e2a.kube import replicas
from e2a.kube.replicas import Replica

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def engine():
    url = os.environ.get("E2A_TEST_PG_URL")
    if not url:
        pytest.skip("E2A_TEST_PG_URL not set (make test starts PostgreSQL and sets it)")
    engine = create_async_engine(url)
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
