"""Sign-in and API keys (docs/accounts.md).

`POST /v1/auth/login` and `POST /v1/auth/verify-otp` need no credentials (the RequestGuard's
OPEN_ROUTES); they are rate-limited by the accounts service. The API-key routes take the login JWT
only (`login_user`): a leaked API key cannot mint more keys, nor revoke the owner's other keys.
One exception: an API key may revoke itself (`e2a logout` does, and a key that knows it leaked can
end itself).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from e2a.accounts.service import Accounts
from e2a.api.deps import LOGIN_ONLY, account_user, login_user
from e2a.api.errors import ApiError
from e2a.api.schemas import (ApiKeyCreated, ApiKeyOut, ApiKeysOut, LoginIn, LoginOut,
                             VerifyOtpIn, VerifyOtpOut)
from e2a.auth import Caller
from e2a.store.models import ApiKey

router = APIRouter(tags=["accounts"])


def accounts(request: Request) -> Accounts:
    return request.app.state.accounts


def _client(request: Request) -> str | None:
    # The peer's address; behind a reverse proxy uvicorn takes it from X-Forwarded-For when
    # E2A_TRUSTED_PROXIES names that proxy (by default no proxy is believed).
    return request.client.host if request.client else None


def _key_out(row: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(key_id=row.id, prefix=row.prefix, revoked=row.revoked,
                     created_at=row.created_at, plan_tier=row.plan_tier)


@router.post("/v1/auth/login", response_model=LoginOut,
             responses={400: {}, 429: {}, 503: {}})
async def login(req: LoginIn, request: Request, svc: Accounts = Depends(accounts)) -> LoginOut:
    """Send a one-time login code to `email`, making the account (with the free credits) if it is
    new. The answer is the same either way. 429 with Retry-After beyond 5 codes per address or
    E2A_LOGIN_PER_CLIENT per client address in 15 minutes; 503 when the mail server fails."""
    sent = await svc.login(req.email, _client(request))
    minutes = max(1, sent.expires_in // 60)
    where = ("the e2a server's log (E2A_SMTP_HOST is unset)" if sent.to_log
             else sent.email)
    return LoginOut(email=sent.email, expires_in=sent.expires_in,
                    message=f"a login code was sent to {where}; it expires in {minutes} "
                            f"minute{'s' if minutes != 1 else ''}")


@router.post("/v1/auth/verify-otp", response_model=VerifyOtpOut,
             responses={400: {}, 401: {}, 429: {}})
async def verify_otp(req: VerifyOtpIn, request: Request,
                     svc: Accounts = Depends(accounts)) -> VerifyOtpOut:
    """Trade the emailed code for a login JWT. 401 `invalid_code` when it is wrong, expired,
    used, superseded by a newer one or dead after 5 tries."""
    done = await svc.verify(req.email, req.code, _client(request))
    return VerifyOtpOut(token=done.token, user_id=done.user_id, email=done.email)


@router.post("/v1/api-keys", response_model=ApiKeyCreated, status_code=201,
             responses={401: {}, 409: {}})
async def create_api_key(user: Caller = Depends(login_user),
                         svc: Accounts = Depends(accounts)) -> ApiKeyCreated:
    """A new API key (`e2a_live_...`), shown this once. Takes the login JWT."""
    row, secret = await svc.create_key(user.id)
    return ApiKeyCreated(key_id=row.id, key=secret, prefix=row.prefix)


@router.get("/v1/api-keys", response_model=ApiKeysOut, responses={401: {}})
async def list_api_keys(user: Caller = Depends(login_user),
                        svc: Accounts = Depends(accounts)) -> ApiKeysOut:
    """The caller's keys, newest first, revoked ones too; never a key itself."""
    return ApiKeysOut(api_keys=[_key_out(r) for r in await svc.keys(user.id)])


@router.delete("/v1/api-keys/{key_id}", response_model=ApiKeyOut, responses={401: {}, 404: {}})
async def revoke_api_key(key_id: str, user: Caller = Depends(account_user),
                         svc: Accounts = Depends(accounts)) -> ApiKeyOut:
    """Revoke a key at once and for good (a repeat is harmless). With the login JWT any of the
    caller's keys; with an API key, that key only. Another user's key: 404."""
    if user.via != "login" and key_id != user.key_id:
        raise ApiError(401, "unauthorized", LOGIN_ONLY + " (an API key may revoke only itself)")
    return _key_out(await svc.revoke_key(user.id, key_id))
