"""Billing routes (docs/billing.md): balance, transactions, usage, Stripe Checkout and its
webhook, auto top-up. They take the login JWT or an API key (`account_user`); the webhook takes
Stripe's signature instead (the request guard lets it through without credentials)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from e2a.api.deps import account_user, login_user
from e2a.api.errors import ApiError
from e2a.auth import Caller
from e2a.billing.service import Billing, TopupConfig

router = APIRouter(tags=["billing"])

MAX_WEBHOOK = 1024 * 1024  # Stripe's events are a few KB
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(9998, 12, 31, tzinfo=timezone.utc)


def billing(request: Request) -> Billing:
    return request.app.state.billing


class AutoTopupFailure(BaseModel):
    at: datetime
    message: str


class AutoTopupOut(BaseModel):
    enabled: bool
    threshold: int = Field(description="credits: a top-up starts when the balance falls below")
    credit_amount: int = Field(description="credits bought by each top-up")
    payment_method_saved: bool = Field(description="a card was saved by a checkout purchase")
    last_failure: AutoTopupFailure | None = Field(
        description="the last top-up that failed; top-ups wait until the settings are saved "
                    "again or credits are bought")


class BalanceOut(BaseModel):
    credit_balance: float = Field(description="credits (1 credit = 1 US cent), exact to 6 "
                                              "decimal places; below 0 within the grace")
    credit_balance_micro: int = Field(description="the same in micro-credits")
    auto_topup: AutoTopupOut


class TransactionOut(BaseModel):
    id: str = Field(description="txn_…")
    amount: float = Field(description="credits; negative for usage (positive on the usage row "
                                      "that gives back a charge past a sandbox's pause or end)")
    amount_micro: int
    description: str
    timestamp: datetime
    kind: Literal["grant", "purchase", "usage", "storage", "refund", "adjustment",
                  "topup_failed"]
    sandbox_id: str | None
    workspace_id: str | None


class TransactionsOut(BaseModel):
    transactions: list[TransactionOut]


class UsageItem(BaseModel):
    key: str = Field(description="the sandbox id, template or day (YYYY-MM-DD, UTC); "
                                 "\"workspaces\" for storage under sandbox and template")
    credits: float
    vcpu_seconds: float
    gib_seconds: float
    workspace_gib_hours: float


class UsageTotal(BaseModel):
    credits: float
    vcpu_seconds: float
    gib_seconds: float
    workspace_gib_hours: float


class Rates(BaseModel):
    vcpu_second: float
    gib_second: float
    workspace_gib_hour: float


class UsageOut(BaseModel):
    from_: datetime = Field(alias="from")
    to: datetime
    group_by: str
    items: list[UsageItem]
    total: UsageTotal
    rates: Rates = Field(description="credits per unit")

    model_config = ConfigDict(populate_by_name=True)


class Checkout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    credit_amount: int = Field(description="credits to buy (1 credit = 1 US cent)")


class CheckoutOut(BaseModel):
    url: str = Field(description="the Stripe Checkout page to send the buyer to")
    purchase_id: str


class AutoTopupIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool
    threshold: int = Field(0, ge=0, le=1_000_000, description="credits")
    credit_amount: int = Field(0, ge=0, le=1_000_000, description="credits per top-up")


@router.get("/v1/billing/balance", response_model=BalanceOut, responses={401: {}})
async def balance(user: Caller = Depends(account_user), b: Billing = Depends(billing)):
    return await b.balance(user.id)


@router.get("/v1/billing/transactions", response_model=TransactionsOut, responses={401: {}})
async def transactions(limit: int = Query(20, ge=1, le=1000), offset: int = Query(0, ge=0,
                                                                                  le=10**9),
                       user: Caller = Depends(account_user), b: Billing = Depends(billing)):
    """Newest first."""
    return {"transactions": await b.transactions(user.id, limit, offset)}


def _when(value: str | None, name: str, default: datetime) -> datetime:
    if value is None:
        return default
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # UTC, as the ledger's times are stored (SQLite keeps no offset); the window's default
        # start is 30 days before its end, so both must leave room for that
        when = when.astimezone(timezone.utc) if when.tzinfo else when.replace(tzinfo=timezone.utc)
        if not EARLIEST <= when <= LATEST:
            raise OverflowError
    except ValueError:
        raise ApiError(400, "invalid_field", f"{name} must be an ISO 8601 date or time, such "
                       "as 2026-11-01 or 2026-11-01T12:00:00Z", name) from None
    except OverflowError:
        raise ApiError(400, "invalid_field", f"{name} must be between the years 1970 and 9998",
                       name) from None
    return when


@router.get("/v1/usage", response_model=UsageOut, response_model_by_alias=True,
            responses={400: {}, 401: {}})
async def usage(from_: str | None = Query(None, alias="from", max_length=40,
                                          description="start (inclusive); default 30 days ago"),
                to: str | None = Query(None, max_length=40, description="end (exclusive); "
                                       "default now"),
                group_by: Literal["sandbox", "template", "day"] = "day",
                user: Caller = Depends(account_user), b: Billing = Depends(billing)):
    """Credits spent, and the vCPU-seconds, GiB-seconds and workspace GiB-hours behind them."""
    now = datetime.now(timezone.utc)
    end = _when(to, "to", now)
    start = _when(from_, "from", end - timedelta(days=30))
    if start > end:
        raise ApiError(400, "invalid_field", "from is after to", "from")
    return await b.usage(user.id, start, end, group_by)


@router.post("/v1/billing/checkout", response_model=CheckoutOut,
             responses={400: {}, 401: {}, 429: {}, 501: {}, 503: {}})
async def checkout(req: Checkout, request: Request, user: Caller = Depends(account_user),
                   b: Billing = Depends(billing)):
    """A Stripe Checkout page for `credit_amount` credits; they arrive when Stripe's webhook
    says the payment succeeded."""
    base = request.app.state.settings.public_url or str(request.base_url).rstrip("/")
    return await b.checkout(user.id, req.credit_amount, base.rstrip("/"))


@router.get("/v1/billing/checkout/done", response_class=HTMLResponse, include_in_schema=False)
async def checkout_done(result: str = "paid"):
    """Where Stripe Checkout sends the buyer back (when no page of the operator's is set)."""
    text = ("Payment received: your credits arrive as soon as Stripe confirms it."
            if result == "paid" else "Checkout was cancelled; nothing was charged.")
    return HTMLResponse(f"<!doctype html><title>e2a</title><p>{text}</p>")


@router.post("/v1/billing/webhook", responses={400: {}, 501: {}}, include_in_schema=False)
async def webhook(request: Request, b: Billing = Depends(billing)):
    """Stripe's events, verified by their signature (E2A_STRIPE_WEBHOOK_SECRET)."""
    payload = await request.body()
    if len(payload) > MAX_WEBHOOK:
        raise ApiError(413, "body_too_large", "a Stripe event is at most 1 MiB")
    await b.webhook(payload, request.headers.get("stripe-signature"))
    return {"received": True}


@router.get("/v1/billing/auto-topup", response_model=AutoTopupOut, responses={401: {}})
async def get_auto_topup(user: Caller = Depends(account_user), b: Billing = Depends(billing)):
    return await b.topup_config(user.id)


@router.put("/v1/billing/auto-topup", response_model=AutoTopupOut,
            responses={400: {}, 401: {}, 409: {}, 501: {}})
async def put_auto_topup(req: AutoTopupIn, user: Caller = Depends(login_user),
                         b: Billing = Depends(billing)):
    """When the balance falls below `threshold`, charge the card saved by a checkout for
    `credit_amount` credits. Takes the login JWT only: these settings charge the card without
    its owner, so a leaked API key must not be able to change them. A declined charge is shown here and in the transactions, and no
    other is tried until these settings are saved again or credits are bought."""
    return await b.set_topup(user.id, TopupConfig(req.enabled, req.threshold,
                                                  req.credit_amount))
