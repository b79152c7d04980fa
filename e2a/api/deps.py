"""Request-scoped helpers: the caller (by API key; by login JWT where a route allows it), the
sandbox host and catalog, and the caller's sandbox. The API knows sandboxes only through the two
interfaces of sandboxes/host.py."""

from __future__ import annotations

from fastapi import Request

from e2a import auth
from e2a.accounts.tokens import InvalidToken, looks_like_jwt
from e2a.api.errors import ApiError
from e2a.api.hop_tokens import FORWARDED, NOT_VALID, HopClaims, InvalidHop, is_hop_token
from e2a.auth import Caller
from e2a.sandboxes.host import Catalog, PauseFailed, SandboxHost, SandboxRecord, WrongState


def host(request: Request) -> SandboxHost:
    return request.app.state.host


def catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


KEY_ONLY = ("this route takes an API key (Authorization: Bearer e2a_live_...), not the login "
            "token: create a key with POST /v1/api-keys")
LOGIN_ONLY = ("this route takes the login token (Authorization: Bearer <token from POST "
              "/v1/auth/verify-otp>), not an API key: a leaked key must not manage keys or "
              "change what is charged to the card")


async def caller_from_header(app, header: str | None, allow_login: bool = False) -> Caller:
    """The caller of an `Authorization: Bearer` header: an API key (via "key"), or, where
    `allow_login`, a login JWT (via "login", docs/accounts.md). A login JWT elsewhere is a 401
    saying that the route takes an API key."""
    key = bearer(header)
    if key is None:
        raise ApiError(401, "unauthorized", "missing API key: send Authorization: Bearer e2a_live_...")
    if not key.startswith(auth.KEY_PREFIX) and looks_like_jwt(key):
        tokens = getattr(app.state, "login_tokens", None)
        if not allow_login or tokens is None:
            raise ApiError(401, "unauthorized", KEY_ONLY)
        try:
            claims = tokens.verify(key)
        except InvalidToken as exc:
            raise ApiError(401, "unauthorized", str(exc)) from None
        return Caller(id=claims.user_id, key_id=None, via="login")
    cache: auth.KeyCache = app.state.keys
    caller = cache.get(key)
    if caller is None:
        async with app.state.sessions() as db:
            caller = await auth.caller_for_key(db, key)
        if caller is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key")
        cache.put(key, caller)
    return caller


def named_replica(values: list[str]) -> str | None:
    """The replica a passed-on request names (`x-e2a-forwarded`), if any; two are a 400: which
    of them would each check read?"""
    if len(values) > 1:
        raise ApiError(400, "invalid_header", f"{FORWARDED} is given more than once", FORWARDED)
    return values[0] if values else None


def hop_caller(app, header: str | None, method: str, path: str, named: str
               ) -> tuple[Caller, HopClaims] | None:
    """The caller of a request another replica passed on (`named`: its `x-e2a-forwarded`), by
    the token that replica signed for it (api/hop_tokens.py), standing for the API key that
    replica checked; None if the credential is not a hop token (an API key or a login token
    is checked as such). A 401 unless the token is for this very request to this replica."""
    token = bearer(header)
    if token is None or token.startswith(auth.KEY_PREFIX) or not looks_like_jwt(token) \
            or not is_hop_token(token):
        return None
    tokens = getattr(app.state, "hop_tokens", None)
    host = getattr(app.state, "host", None)
    mine = host.replica_key() if host is not None else None
    try:
        if tokens is None or mine is None or named != str(mine):
            raise InvalidHop(NOT_VALID)
        claims = tokens.verify(token, method, path, str(mine))
    except InvalidHop as exc:
        raise ApiError(401, "unauthorized", str(exc)) from None
    return Caller(id=claims.user_id, key_id=claims.key_id), claims


async def _caller(request: Request) -> Caller:
    caller = request.scope.get("state", {}).get("caller")  # found by the RequestGuard
    if caller is not None:
        return caller
    return await caller_from_header(request.app, request.headers.get("authorization"),
                                    allow_login=True)


async def current_user(request: Request) -> Caller:
    """The caller, by API key only: every sandbox, session, workspace, secret, task and template
    route."""
    caller = await _caller(request)
    if caller.via != "key":
        raise ApiError(401, "unauthorized", KEY_ONLY)
    return caller


async def account_user(request: Request) -> Caller:
    """The caller by API key or by login JWT (`via` says which): the billing and usage routes."""
    return await _caller(request)


async def login_user(request: Request) -> Caller:
    """The caller by login JWT only: managing API keys (a leaked key must not mint more)."""
    caller = await _caller(request)
    if caller.via != "login":
        raise ApiError(401, "unauthorized", LOGIN_ONLY)
    return caller


async def owned_sandbox(app, user: Caller, sandbox_id: str) -> SandboxRecord:
    rec = await app.state.catalog.get(sandbox_id)
    # Someone else's sandbox is indistinguishable from one that does not exist.
    if rec is None or rec.user_id != user.id:
        raise ApiError(404, "sandbox_not_found", f"no sandbox {sandbox_id!r}", "vm_id")
    return rec


async def running_sandbox(app, user: Caller, sandbox_id: str) -> str:
    """The id of the caller's running sandbox (answered from memory on the hot path). A paused
    one created with auto_resume is resumed first (docs/pause.md)."""
    return require_running(await awake(app, user, await owned_sandbox(app, user, sandbox_id)))


async def awake(app, user: Caller, rec: SandboxRecord) -> SandboxRecord:
    if rec.state == "paused" and rec.auto_resume:
        return await resume_sandbox(app, user, rec, wake=True)
    return rec


async def resume_sandbox(app, user: Caller, rec: SandboxRecord,
                         wake: bool = False) -> SandboxRecord:
    """Resume, after the funds check a create makes (it runs, so it costs again). `wake`: a
    call into an auto_resume sandbox, for which one already running again is fine."""
    try:
        async with app.state.billing.funds_for(user.id, rec.template):
            return await app.state.host.resume(rec.id, wake=wake)
    except WrongState as exc:
        raise wrong_state(exc) from exc
    except PauseFailed as exc:
        raise ApiError(503, "resume_failed", str(exc), "vm_id") from exc


def wrong_state(exc: WrongState) -> ApiError:
    return ApiError(409, "invalid_state", str(exc), "vm_id")


def require_running(rec: SandboxRecord) -> str:
    """The sandbox's id if it is running, else 409."""
    if rec.state != "running":
        raise ApiError(409, "sandbox_not_running", f"sandbox {rec.id} is {rec.state}", "vm_id")
    return rec.id
