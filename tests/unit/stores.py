"""A migrated store of a test's own, with users in it: on SQLite in the test's directory, or
on the suite's PostgreSQL (E2A_TEST_PG_URL) in a schema of its own, so that tests running in
parallel never share tables."""

from __future__ import annotations

import os

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from e2a import auth
from e2a.store import db as store


async def migrated(url: str, emails=("a@example.com", "b@example.com"), free_credits: int = 0):
    """(engine, sessionmaker, user ids) of a fresh store at `url`."""
    return await _filled(store.make_engine(url), emails, free_credits)


async def _filled(engine, emails, free_credits: int):
    await store.migrate(engine)
    sessions = store.sessionmaker(engine)
    async with sessions() as db:
        users = [(await auth.create_user(db, e, free_credits)).id for e in emails]
        await db.commit()
    return engine, sessions, users


def sqlite_url(tmp_path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'e2a.db'}"


async def pg_engine(schema: str):
    """An engine on the suite's PostgreSQL whose tables live in `schema` (made empty), or None
    when E2A_TEST_PG_URL is unset."""
    url = os.environ.get("E2A_TEST_PG_URL")
    if not url:
        return None
    admin = create_async_engine(url)
    async with admin.begin() as conn:
        await conn.execute(text(f'drop schema if exists "{schema}" cascade'))
        await conn.execute(text(f'create schema "{schema}"'))
    await admin.dispose()
    return create_async_engine(url, pool_size=20, max_overflow=40,
                               connect_args={"server_settings": {"search_path": schema}})


async def migrated_pg(schema: str, emails=("a@example.com", "b@example.com"),
                      free_credits: int = 0):
    engine = await pg_engine(schema)
    return None if engine is None else await _filled(engine, emails, free_credits)


async def either(backend: str, tmp_path, name: str, free_credits: int = 0):
    """A migrated store on `backend` ("sqlite" or "postgresql", in the schema `name` of this
    xdist worker), or a pytest skip when PostgreSQL is not set up."""
    import pytest
    if backend == "sqlite":
        return await migrated(sqlite_url(tmp_path), free_credits=free_credits)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    made = await migrated_pg(f"{name}_{worker}", free_credits=free_credits)
    if made is None:
        pytest.skip("E2A_TEST_PG_URL not set (make test starts PostgreSQL and sets it)")
    return made
