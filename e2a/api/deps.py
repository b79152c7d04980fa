"""Request-scoped helpers: the database session, the caller (by API key), their sandbox."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession

from e2a import auth
from e2a.api.errors import ApiError
from e2a.sandboxes.manager import Live, Manager
from e2a.auth import Caller
from e2a.store.models import Sandbox


async def db_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as db:
        yield db


def manager(request: Request) -> Manager:
    return request.app.state.manager


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


async def caller_from_header(app, header: str | None) -> Caller:
    key = bearer(header)
    if key is None:
        raise ApiError(401, "unauthorized", "missing API key: send Authorization: Bearer e2a_live_...")
    cache: auth.KeyCache = app.state.keys
    caller = cache.get(key)
    if caller is None:
        async with app.state.sessions() as db:
            caller = await auth.caller_for_key(db, key)
        if caller is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key")
        cache.put(key, caller)
    return caller


async def current_user(request: Request) -> Caller:
    return await caller_from_header(request.app, request.headers.get("authorization"))


async def running_sandbox(app, user: Caller, sandbox_id: str) -> Live:
    """The caller's running sandbox. From memory on the hot path (no database query); only a
    sandbox that is not running here is looked up, to answer 404 or 409."""
    mgr: Manager = app.state.manager
    live = mgr.live.get(sandbox_id)
    if live is not None and live.user_id == user.id and not live.destroying:
        live.touch()
        return live
    async with app.state.sessions() as db:
        return running(mgr, await owned_sandbox(db, user, sandbox_id))


async def owned_sandbox(db: AsyncSession, user: Caller, sandbox_id: str) -> Sandbox:
    row = await db.get(Sandbox, sandbox_id) if len(sandbox_id) <= 32 else None
    # Someone else's sandbox is indistinguishable from one that does not exist.
    if row is None or row.user_id != user.id:
        raise ApiError(404, "sandbox_not_found", f"no sandbox {sandbox_id!r}", "vm_id")
    return row


def running(mgr: Manager, row: Sandbox) -> Live:
    live = mgr.live.get(row.id)
    if row.state != "running" or live is None or live.destroying:
        raise ApiError(409, "sandbox_not_running", f"sandbox {row.id} is {row.state}", "vm_id")
    live.touch()
    return live
