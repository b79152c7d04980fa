"""Request-scoped helpers: the caller (by API key), the sandbox host and catalog, and the
caller's sandbox. The API knows sandboxes only through the two interfaces of sandboxes/host.py."""

from __future__ import annotations

from fastapi import Request

from e2a import auth
from e2a.api.errors import ApiError
from e2a.auth import Caller
from e2a.sandboxes.host import Catalog, SandboxHost, SandboxRecord


def host(request: Request) -> SandboxHost:
    return request.app.state.host


def catalog(request: Request) -> Catalog:
    return request.app.state.catalog


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
    caller = request.scope.get("state", {}).get("caller")  # found by the RequestGuard
    if caller is not None:
        return caller
    return await caller_from_header(request.app, request.headers.get("authorization"))


async def owned_sandbox(app, user: Caller, sandbox_id: str) -> SandboxRecord:
    rec = await app.state.catalog.get(sandbox_id)
    # Someone else's sandbox is indistinguishable from one that does not exist.
    if rec is None or rec.user_id != user.id:
        raise ApiError(404, "sandbox_not_found", f"no sandbox {sandbox_id!r}", "vm_id")
    return rec


async def running_sandbox(app, user: Caller, sandbox_id: str) -> str:
    """The id of the caller's running sandbox (answered from memory on the hot path)."""
    return require_running(await owned_sandbox(app, user, sandbox_id))


def require_running(rec: SandboxRecord) -> str:
    """The sandbox's id if it is running, else 409."""
    if rec.state != "running":
        raise ApiError(409, "sandbox_not_running", f"sandbox {rec.id} is {rec.state}", "vm_id")
    return rec.id
