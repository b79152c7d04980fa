"""Credits as the API sees them: balance, transactions, usage, the funds check at create,
purchases through Stripe (checkout, webhook, auto top-up), ending sandboxes whose owner ran out,
and admin grants (docs/billing.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import Date, cast, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from e2a.billing import ledger
from e2a.billing.metering import Metering
from e2a.billing.rates import MICRO, Rates, show, to_credits, to_micro, vcpu_milli
from e2a.billing.stripe_gateway import StripeGateway, StripeUnavailable, WebhookRejected
from e2a.ids import new_id
from e2a.refusal import Refusal
from e2a.sandboxes.host import Catalog, SandboxHost
from e2a.sandboxes.records import aware, utcnow
from e2a.sandboxes.resources import uninterrupted
from e2a.sandboxes.states import EndReason
from e2a.store import locks
from e2a.store.models import (Account, CreditHold, LedgerEntry, Purchase, Sandbox,
                             StripeEvent, User)
from e2a.templates import recipes

log = logging.getLogger("e2a.billing")

MAX_PURCHASE = 1_000_000        # credits in one purchase ($10,000)
STRIPE_RETRY = 300.0            # seconds before an auto top-up is tried again after Stripe was
                                # unreachable (a declined card waits for the user instead)
DAY = timedelta(hours=24)
CHECKOUTS_PER_HOUR = 30        # Checkout pages one user may open per hour
MAX_TOPUPS = 10                 # auto top-ups per user per 24 hours, whatever their outcome
MAX_TOPUP_FAILURES = 2          # failed ones per 24 hours (each save of the settings retries)
# A create's hold is deleted when the create ends; this frees one whose replica died first (a
# create, cold image pull included, ends well within it).
HOLD_TTL = timedelta(minutes=15)


def _text(value) -> str | None:
    """A Stripe id from an event, if it is one."""
    return value if isinstance(value, str) and 0 < len(value) <= 255 else None


class BillingError(Refusal):
    """A billing request refused (402, 409, 429, 501, …)."""


@dataclass(frozen=True)
class TopupConfig:
    enabled: bool
    threshold: int
    credit_amount: int


class Billing:
    def __init__(self, sessions: async_sessionmaker, settings, host: SandboxHost,
                 catalog: Catalog, gateway: StripeGateway | None, workspaces=None):
        self.db = sessions
        self.settings = settings
        self.host = host
        self.catalog = catalog
        self.gateway = gateway
        self.rates = Rates.from_settings(settings)
        self.grace = to_micro(settings.credit_grace)
        self.metering = Metering(
            sessions, settings, self.rates, on_charged=self.after_charge,
            count_storage=workspaces.count_uploaded if workspaces is not None else None)
        self._funds_locks: dict[str, asyncio.Lock] = {}
        self._ending: set[str] = set()          # sandboxes being ended for credits
        self._topping: set[str] = set()         # users with a top-up under way here
        self._stripe_down_until: dict[str, float] = {}
        self._background: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.metering.start()

    async def stop(self) -> None:
        await self.metering.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.gateway is not None:
            await self.gateway.aclose()

    def _in_background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- what things cost -------------------------------------------------------------------

    def first_minute(self, template: str) -> int:
        """Micro-credits a sandbox of this template costs in its first minute."""
        recipe = recipes.load(template)
        return 60 * self.rates.per_second(vcpu_milli(recipe.vcpu, recipe.cpu_fraction),
                                          recipe.memory_mib)

    @contextlib.asynccontextmanager
    async def funds_for(self, user_id: str, template: str, count: int = 1):
        """Around a create (or a resume, or a fork of `count`): 402 `insufficient_credits` unless
        the balance pays a minute of the new sandboxes and of every sandbox the user already
        runs or is creating; that minute is held while the create runs, so creates sent at once
        cannot all pass one check. The holds are rows (CreditHold), checked and added under the
        user's lock in one transaction: creates through other replicas see them too."""
        need = self.first_minute(template) * count
        async with self._funds_locks.setdefault(user_id, asyncio.Lock()):
            hold = await self._hold_first_minute(user_id, template, count, need)
        try:
            yield
        finally:  # created (now in the catalog, counted as running) or failed
            await uninterrupted(self._let_go_of(hold, user_id))

    async def _hold_first_minute(self, user_id: str, template: str, count: int, need: int) -> str:
        """Check that the balance pays `need` besides what the user runs and holds; hold it.
        One session throughout (a second one taken while this one holds its connection could
        wait on a pool that creates at once have emptied)."""
        for _ in range(2):
            async with self.db() as db:
                try:
                    await locks.lock_user(db, locks.FUNDS, user_id)
                except locks.LockBusy as exc:
                    raise BillingError(503, "unavailable", "another create of this user is "
                                       "checking its credits; try again") from exc
                # Read under the lock: a create through another replica is seen as its hold
                # until its row is in (the row goes in before the hold goes), never as neither.
                now = utcnow()
                held = (select(func.coalesce(func.sum(CreditHold.amount_micro), 0))
                        .where(CreditHold.user_id == user_id, CreditHold.expires_at >= now)
                        .scalar_subquery())
                found = (await db.execute(select(Account.balance_micro, held)
                                          .where(Account.user_id == user_id))).one_or_none()
                if found is not None:
                    have, held = found
                    sizes = (await db.execute(
                        select(Sandbox.vcpu, Sandbox.cpu_fraction, Sandbox.memory_mib).where(
                            Sandbox.user_id == user_id,
                            Sandbox.state.not_in(["paused", "stopping", "destroyed"])))).all()
                    running = sum(60 * self.rates.per_second(vcpu_milli(v, f), m)
                                  for v, f, m in sizes)
                    self._check_funds(have, need, running + held, template, count)
                    hold = new_id("hold")
                    await db.execute(insert(CreditHold).values(
                        id=hold, user_id=user_id, amount_micro=need,
                        expires_at=now + HOLD_TTL))
                    await db.commit()
                    return hold
            await self.account(user_id)  # its first use: opened with the free credits
        raise RuntimeError(f"no account for {user_id}")

    @staticmethod
    def _check_funds(have: int, need: int, others: int, template: str, count: int) -> None:
        if have >= need + others:
            return
        also = (f" and a minute of the {show(others)} credits' worth of sandboxes you already "
                "have" if others else "")
        raise BillingError(
            402, "insufficient_credits",
            f"your balance is {show(have)} credits; the first minute of "
            f"{f'{count} {template} sandboxes' if count > 1 else f'a {template} sandbox'}"
            f" costs {show(need)}{also}. Buy credits (POST /v1/billing/checkout) or turn on "
            "auto top-up")

    async def _let_go_of(self, hold: str, user_id: str) -> None:
        """The create's hold deleted (with any of the user's that expired). A failure is only
        logged: the create's own answer stands, and the hold expires (HOLD_TTL)."""
        try:
            async with self.db() as db:
                await db.execute(delete(CreditHold).where(or_(
                    CreditHold.id == hold, (CreditHold.user_id == user_id)
                    & (CreditHold.expires_at < utcnow()))))
                await db.commit()
        except Exception as exc:
            log.warning("credit hold %s of %s not deleted (it expires): %s", hold, user_id, exc)

    # ---- what the user sees -----------------------------------------------------------------

    async def account(self, user_id: str) -> Account:
        """The user's account (opened with the free credits if this is its first use): one
        query when it exists, as on every create."""
        async with self.db() as db:
            acct = await db.get(Account, user_id)
            if acct is None:
                await ledger.ensure_account(db, user_id, self.settings.free_credits)
                await db.commit()
                acct = await db.get(Account, user_id, populate_existing=True)
            return acct

    async def balance(self, user_id: str) -> dict:
        acct = await self.account(user_id)
        return {"credit_balance": to_credits(acct.balance_micro),
                "credit_balance_micro": acct.balance_micro,
                "auto_topup": self._topup_view(acct)}

    def _topup_view(self, acct: Account) -> dict:
        failed = None
        if acct.topup_failed_at is not None:
            failed = {"at": aware(acct.topup_failed_at), "message": acct.topup_error or "declined"}
        return {"enabled": acct.topup_enabled, "threshold": acct.topup_threshold,
                "credit_amount": acct.topup_credits,
                "payment_method_saved": acct.payment_method_id is not None,
                "last_failure": failed}

    async def transactions(self, user_id: str, limit: int, offset: int) -> list[dict]:
        async with self.db() as db:
            rows = await ledger.entries(db, user_id, limit, offset)
        return [{"id": r.id, "amount": to_credits(r.amount_micro),
                 "amount_micro": r.amount_micro, "description": r.description,
                 "timestamp": aware(r.created_at), "kind": r.kind, "sandbox_id": r.sandbox_id,
                 "workspace_id": r.workspace_id} for r in rows]

    async def usage(self, user_id: str, start: datetime, end: datetime, group_by: str) -> dict:
        async with self.db() as db:
            if group_by == "day":
                key = (func.date(LedgerEntry.created_at) if db.bind.dialect.name == "sqlite"
                       else cast(func.timezone("UTC", LedgerEntry.created_at), Date))
            elif group_by == "template":
                key = func.coalesce(LedgerEntry.template, "workspaces")
            else:
                key = func.coalesce(LedgerEntry.sandbox_id, "workspaces")
            q = (select(key.label("key"), func.sum(LedgerEntry.amount_micro),
                        func.sum(LedgerEntry.vcpu_seconds), func.sum(LedgerEntry.gib_seconds),
                        func.sum(LedgerEntry.gib_hours))
                 .where(LedgerEntry.user_id == user_id,
                        LedgerEntry.kind.in_(("usage", "storage")),
                        LedgerEntry.created_at >= start, LedgerEntry.created_at < end)
                 .group_by(key).order_by(key))
            rows = (await db.execute(q)).all()
        items = []
        for k, micro, vcpu_s, gib_s, gib_h in rows:
            items.append({"key": k.isoformat() if isinstance(k, date) else str(k),
                          "credits": to_credits(-int(micro or 0)),
                          "vcpu_seconds": round(vcpu_s or 0, 3),
                          "gib_seconds": round(gib_s or 0, 3),
                          "workspace_gib_hours": round(gib_h or 0, 9)})
        total = {f: round(sum(i[f] for i in items), 9)
                 for f in ("credits", "vcpu_seconds", "gib_seconds", "workspace_gib_hours")}
        return {"from": start, "to": end, "group_by": group_by, "items": items, "total": total,
                "rates": {"vcpu_second": to_credits(self.rates.vcpu_second),
                          "gib_second": to_credits(self.rates.gib_second),
                          "workspace_gib_hour": to_credits(self.rates.workspace_gib_hour)}}

    # ---- after each metering tick -----------------------------------------------------------

    async def after_charge(self, user_ids: set[str]) -> None:
        async with self.db() as db:
            accts = (await db.execute(select(Account).where(Account.user_id.in_(user_ids)))
                     ).scalars().all()
        for acct in accts:
            if acct.balance_micro < -self.grace:
                await self._end_sandboxes(acct.user_id)
            if not acct.topup_enabled:
                continue
            below = acct.balance_micro < acct.topup_threshold * MICRO
            if not below and not acct.topup_armed:  # back over the threshold: the next fall tops up
                async with self.db() as db:
                    await db.execute(update(Account).where(Account.user_id == acct.user_id)
                                     .values(topup_armed=True))
                    await db.commit()
            elif (below and acct.topup_armed and acct.topup_failed_at is None
                  and acct.user_id not in self._topping):
                self._topping.add(acct.user_id)
                self._in_background(self._auto_topup(acct.user_id))

    async def _end_sandboxes(self, user_id: str) -> None:
        """The balance ran out (past the grace): every sandbox of the user ends, each after its
        workspace is flushed (the normal teardown)."""
        for rec in await self.catalog.list(user_id):
            if rec.id in self._ending or rec.state in ("stopping", "destroyed"):
                continue
            log.info("ending sandbox %s of %s: out of credits", rec.id, user_id)
            self._ending.add(rec.id)
            self._in_background(self._end(rec.id))

    async def _end(self, sandbox_id: str) -> None:
        try:
            await self.host.destroy(sandbox_id, EndReason.OUT_OF_CREDITS)
        except Exception as exc:
            log.warning("ending sandbox %s for credits failed: %s", sandbox_id, exc)
        finally:
            self._ending.discard(sandbox_id)

    # ---- auto top-up ------------------------------------------------------------------------

    async def topup_config(self, user_id: str) -> dict:
        return self._topup_view(await self.account(user_id))

    async def set_topup(self, user_id: str, cfg: TopupConfig) -> dict:
        if cfg.enabled:
            self._need_gateway()
            if cfg.credit_amount < self.settings.checkout_min_credits:
                raise BillingError(400, "invalid_field", f"credit_amount must be at least "
                                   f"{self.settings.checkout_min_credits} credits",
                                   "credit_amount")
        acct = await self.account(user_id)
        if cfg.enabled and acct.payment_method_id is None:
            raise BillingError(409, "no_payment_method", "auto top-up charges the card saved "
                               "by a purchase: buy credits once through POST "
                               "/v1/billing/checkout first")
        async with self.db() as db:
            # Saving the settings is the user's answer to a failed charge: it lifts the hold.
            await db.execute(update(Account).where(Account.user_id == user_id).values(
                topup_enabled=cfg.enabled, topup_threshold=cfg.threshold,
                topup_credits=cfg.credit_amount, topup_failed_at=None, topup_error=None,
                topup_armed=True))
            await db.commit()
        self._stripe_down_until.pop(user_id, None)
        await self.after_charge({user_id})  # already below the new threshold: top up now
        return await self.topup_config(user_id)

    async def _auto_topup(self, user_id: str) -> None:
        try:
            if time.monotonic() < self._stripe_down_until.get(user_id, 0):
                return
            async with self.db() as db:
                acct = await db.get(Account, user_id)
                recent = dict((await db.execute(
                    select(Purchase.state, func.count()).where(
                        Purchase.user_id == user_id, Purchase.kind == "auto_topup",
                        Purchase.created_at > utcnow() - DAY).group_by(Purchase.state))).all())
            pending = recent.get("pending", 0)
            if (self.gateway is None or acct is None or not acct.topup_enabled or pending
                    or acct.payment_method_id is None or acct.topup_failed_at is not None
                    or not acct.topup_armed
                    or acct.balance_micro >= acct.topup_threshold * MICRO):
                return
            if (recent.get("failed", 0) >= MAX_TOPUP_FAILURES
                    or sum(recent.values()) >= MAX_TOPUPS):
                await self._hold(user_id, f"{sum(recent.values())} auto top-ups in 24 hours, "
                                 f"{recent.get('failed', 0)} of them failed: no more are tried "
                                 "for now; buy credits through checkout")
                return
            async with self.db() as db:  # disarmed here, once, whichever process gets there
                taken = await db.execute(update(Account).where(
                    Account.user_id == user_id, Account.topup_armed.is_(True))
                    .values(topup_armed=False))
                await db.commit()
            if taken.rowcount != 1:
                return
            purchase = await self._new_purchase(user_id, "auto_topup", acct.topup_credits)
            try:
                charge = await self.gateway.charge(
                    customer=acct.stripe_customer_id, payment_method=acct.payment_method_id,
                    amount_cents=purchase.amount_cents, currency=purchase.currency,
                    purchase_id=purchase.id, user_id=user_id, credits=purchase.credits)
            except StripeUnavailable as exc:
                log.warning("auto top-up of %s: Stripe unreachable (%s); tried again in %.0f s",
                            user_id, exc, STRIPE_RETRY)
                self._stripe_down_until[user_id] = time.monotonic() + STRIPE_RETRY
                await self._set_state(purchase.id, "unsent", "Stripe could not be reached")
                async with self.db() as db:  # not the user's card's fault: tried again later
                    await db.execute(update(Account).where(Account.user_id == user_id)
                                     .values(topup_armed=True))
                    await db.commit()
                return
            await self._set_state(purchase.id, "pending", None, charge.payment_intent_id)
            if charge.status == "succeeded":
                await self._fulfil(purchase.id, charge.payment_intent_id)
            elif charge.status == "failed":
                await self._failed(purchase.id, charge.message or "the charge was declined")
            # pending: Stripe's webhook says how it ended
        finally:
            self._topping.discard(user_id)

    async def _hold(self, user_id: str, message: str) -> None:
        async with self.db() as db:
            await db.execute(update(Account).where(Account.user_id == user_id).values(
                topup_failed_at=utcnow(), topup_error=message[:300]))
            await db.commit()

    # ---- purchases --------------------------------------------------------------------------

    def _need_gateway(self) -> StripeGateway:
        if self.gateway is None:
            raise BillingError(501, "payments_not_configured",
                               "this e2a takes no payments (E2A_STRIPE_SECRET_KEY is unset): "
                               "credits come from the free grant and from its administrators")
        return self.gateway

    async def _new_purchase(self, user_id: str, kind: str, credits: int) -> Purchase:
        now = utcnow()
        row = Purchase(id=new_id("pur"), user_id=user_id, kind=kind, credits=credits,
                       amount_cents=credits, currency=self.settings.currency, state="pending",
                       created_at=now, updated_at=now)
        async with self.db() as db:
            db.add(row)
            await db.commit()
        return row

    async def _set_state(self, purchase_id: str, state: str, error: str | None,
                         payment_intent: str | None = None, session: str | None = None) -> None:
        values = {"state": state, "error": error, "updated_at": utcnow()}
        if payment_intent:
            values["stripe_payment_intent_id"] = payment_intent
        if session:
            values["stripe_session_id"] = session
        async with self.db() as db:
            await db.execute(update(Purchase).where(Purchase.id == purchase_id).values(**values))
            await db.commit()

    async def checkout(self, user_id: str, credits: int, base_url: str) -> dict:
        gateway = self._need_gateway()
        low, high = self.settings.checkout_min_credits, MAX_PURCHASE
        if not low <= credits <= high:
            raise BillingError(400, "invalid_field", f"credit_amount must be from {low} to "
                               f"{high} credits (1 credit = 1 US cent)", "credit_amount")
        acct = await self.account(user_id)
        async with self.db() as db:
            email = await db.scalar(select(User.email).where(User.id == user_id))
            opened = await db.scalar(select(func.count()).select_from(Purchase).where(
                Purchase.user_id == user_id, Purchase.kind == "checkout",
                Purchase.created_at > utcnow() - timedelta(hours=1)))
        if opened >= CHECKOUTS_PER_HOUR:  # each is a call on the operator's Stripe account
            raise BillingError(429, "rate_limited", f"{opened} checkouts opened in the last hour: "
                               "pay one of them, or try again later", retry_after=600)
        try:
            customer = await gateway.customer(user_id, email, acct.stripe_customer_id)
            if customer != acct.stripe_customer_id:
                async with self.db() as db:
                    await db.execute(update(Account).where(Account.user_id == user_id)
                                     .values(stripe_customer_id=customer))
                    await db.commit()
            purchase = await self._new_purchase(user_id, "checkout", credits)
            done = f"{base_url}/v1/billing/checkout/done"
            session_id, url = await gateway.checkout(
                customer=customer, purchase_id=purchase.id, user_id=user_id, credits=credits,
                amount_cents=purchase.amount_cents, currency=purchase.currency,
                success_url=self.settings.checkout_success_url or done + "?result=paid",
                cancel_url=self.settings.checkout_cancel_url or done + "?result=cancelled")
        except StripeUnavailable as exc:
            raise BillingError(503, "payments_unavailable", f"Stripe could not be reached: "
                               f"{exc}; try again shortly") from None
        await self._set_state(purchase.id, "pending", None, session=session_id)
        return {"url": url, "purchase_id": purchase.id}

    async def webhook(self, payload: bytes, signature: str | None) -> None:
        """One delivery of a Stripe event. Verified first (400 otherwise); an event seen before
        is answered without a second look; credits are granted once per purchase whatever the
        order, number and kind of the events that say it was paid."""
        gateway = self._need_gateway()
        try:
            event = gateway.parse_webhook(payload, signature)
        except WebhookRejected as exc:
            raise BillingError(400, "invalid_signature", str(exc)) from None
        if len(event["id"]) > 255:
            raise BillingError(400, "invalid_event", "a Stripe event id is at most 255 characters")
        obj = event["data"].get("object")
        obj = obj if isinstance(obj, dict) else {}  # signed, but no object: nothing to do
        kind = event["type"]
        async with self.db() as db:
            if await db.get(StripeEvent, event["id"]) is not None:
                return
        purchase_id = self._purchase_of(obj)
        if purchase_id is not None:
            if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
                if kind.endswith("succeeded") or obj.get("payment_status") == "paid":
                    if await self._matches(purchase_id, obj.get("amount_total"), obj.get("currency")):
                        await self._fulfil(purchase_id, _text(obj.get("payment_intent")),
                                           session=_text(obj.get("id")))
            elif kind == "payment_intent.succeeded":
                if await self._matches(purchase_id, obj.get("amount_received") or obj.get("amount"),
                                       obj.get("currency")):
                    await self._fulfil(purchase_id, _text(obj.get("id")))
            elif kind in ("payment_intent.payment_failed", "checkout.session.async_payment_failed"):
                last = obj.get("last_payment_error")
                error = last.get("message") if isinstance(last, dict) else None
                await self._failed(purchase_id, str(error or "the payment failed"))
            elif kind == "checkout.session.expired":
                await self._expired(purchase_id)
        if kind in ("charge.refunded", "charge.dispute.created", "charge.dispute.closed"):
            await self._money_back(kind, obj)
        async with self.db() as db:
            await db.execute(ledger.insert(db, StripeEvent.__table__).values(
                id=event["id"], type=kind[:64], received_at=utcnow()).on_conflict_do_nothing())
            await db.commit()

    @staticmethod
    def _purchase_of(obj) -> str | None:
        meta = obj.get("metadata")
        found = (meta.get("e2a_purchase") if isinstance(meta, dict) else None) \
            or obj.get("client_reference_id")
        return found if isinstance(found, str) and found.startswith("pur_") else None

    async def _matches(self, purchase_id: str, amount, currency) -> bool:
        """The paid amount is the purchase's (a payload for another amount grants nothing)."""
        async with self.db() as db:
            p = await db.get(Purchase, purchase_id)
        if p is None:
            log.warning("stripe: an event names unknown purchase %s", purchase_id)
            return False
        if amount is not None and (not isinstance(amount, int) or amount != p.amount_cents
                                   or str(currency or p.currency).lower() != p.currency):
            log.warning("stripe: purchase %s was for %s %s, the event says %s %s: ignored",
                        purchase_id, p.amount_cents, p.currency, amount, currency)
            return False
        return True

    async def _fulfil(self, purchase_id: str, payment_intent: str | None,
                      session: str | None = None) -> None:
        method = None
        async with self.db() as db:
            p = await db.get(Purchase, purchase_id)
        if p is None:
            return
        if p.kind == "checkout" and payment_intent and self.gateway is not None:
            try:  # the card it was paid with, for auto top-up
                method = await self.gateway.payment_method_of(payment_intent)
            except StripeUnavailable as exc:
                log.warning("stripe: the card of purchase %s was not saved: %s", purchase_id, exc)
        async with self.db() as db:
            granted = await ledger.post(
                db, p.user_id, p.credits * MICRO, "purchase",
                f"{p.credits} credits bought ({'auto top-up' if p.kind == 'auto_topup' else 'checkout'}, "
                f"{p.amount_cents / 100:.2f} {p.currency.upper()})", ref=f"purchase:{p.id}")
            values = {"state": "succeeded", "error": None, "updated_at": utcnow()}
            if payment_intent:
                values["stripe_payment_intent_id"] = payment_intent
            if session:
                values["stripe_session_id"] = session
            await db.execute(update(Purchase).where(Purchase.id == p.id).values(**values))
            acct_values: dict = {"topup_failed_at": None, "topup_error": None}
            if method:
                acct_values["payment_method_id"] = method
            if granted or method:
                await db.execute(update(Account).where(Account.user_id == p.user_id)
                                 .values(**acct_values))
            await db.commit()
        if granted:
            log.info("purchase %s: %s credits granted to %s", p.id, p.credits, p.user_id)

    async def _failed(self, purchase_id: str, message: str) -> None:
        message = message[:250]
        async with self.db() as db:
            p = await db.get(Purchase, purchase_id)
            if p is None or p.state == "succeeded":
                return  # a late failure of an attempt that was paid after all
            await db.execute(update(Purchase).where(Purchase.id == p.id).values(
                state="failed", error=message, updated_at=utcnow()))
            if p.kind == "auto_topup":
                await db.execute(update(Account).where(Account.user_id == p.user_id).values(
                    topup_failed_at=utcnow(), topup_error=message))
                await ledger.post(db, p.user_id, 0, "topup_failed",
                                  f"auto top-up of {p.credits} credits failed: {message}. Auto "
                                  "top-up is held until its settings are saved again or credits "
                                  "are bought", ref=f"topup_failed:{p.id}")
            await db.commit()

    async def _money_back(self, kind: str, obj: dict) -> None:
        """The money of a paid purchase went back (a refund, a dispute): its credits are taken
        back, at most what it granted; a dispute won gives them again. Once per refund total
        and per dispute, however often Stripe tells."""
        pi = _text(obj.get("payment_intent"))
        async with self.db() as db:
            p = await db.scalar(select(Purchase).where(
                Purchase.stripe_payment_intent_id == pi, Purchase.state == "succeeded")) \
                if pi else None
        if p is None:
            return
        amount = obj.get("amount_refunded" if kind == "charge.refunded" else "amount")
        if not isinstance(amount, int) or amount <= 0:
            return
        back = min(amount, p.amount_cents) * p.credits // p.amount_cents  # cents → credits
        dispute = _text(obj.get("id"))
        if kind == "charge.refunded":
            ref, sign, why = f"refund:{p.id}:{back}", -1, "refunded"
        elif kind == "charge.dispute.created" and dispute:
            ref, sign, why = f"dispute:{dispute}", -1, "disputed"
        elif kind == "charge.dispute.closed" and dispute and obj.get("status") == "won":
            ref, sign, why = f"dispute_won:{dispute}", 1, "dispute won"
        else:
            return
        async with self.db() as db:
            if kind == "charge.refunded":  # amount_refunded is the total so far
                taken = -int(await db.scalar(
                    select(func.coalesce(func.sum(LedgerEntry.amount_micro), 0)).where(
                        LedgerEntry.user_id == p.user_id, LedgerEntry.kind == "refund",
                        LedgerEntry.ref.like(f"refund:{p.id}:%"))) or 0)
                micro = back * MICRO - taken
            else:
                micro = back * MICRO
            if micro > 0:
                await ledger.post(db, p.user_id, sign * micro, "refund",
                                  f"purchase {p.id}: {back} credits {why}", ref=ref)
            await db.commit()

    async def _expired(self, purchase_id: str) -> None:
        async with self.db() as db:
            await db.execute(update(Purchase).where(
                Purchase.id == purchase_id, Purchase.state == "pending").values(
                state="expired", updated_at=utcnow()))
            await db.commit()

    # ---- administration ---------------------------------------------------------------------

    @staticmethod
    async def grant(db, settings, who: str, credits: Decimal, reason: str, actor: str) -> tuple:
        """An admin's adjustment (positive or negative). Returns (user, new balance micro)."""
        user = (await db.execute(select(User).where((User.email == who) | (User.id == who)))
                ).scalar_one_or_none()
        if user is None:
            raise BillingError(404, "user_not_found", f"no user {who!r}")
        await ledger.ensure_account(db, user.id, settings.free_credits)
        amount = to_micro(credits)
        await ledger.post(db, user.id, amount, "adjustment",
                          f"adjustment by an administrator: {reason}", actor=actor)
        await db.flush()
        return user, await ledger.balance(db, user.id)

    @staticmethod
    async def report(db) -> list[dict]:
        """Every account: cached balance, the ledger's sum, and whether they agree."""
        sums = dict((await db.execute(select(LedgerEntry.user_id, func.sum(LedgerEntry.amount_micro))
                                      .group_by(LedgerEntry.user_id))).all())
        rows = (await db.execute(select(User.email, Account).join(Account, Account.user_id == User.id)
                                 .order_by(User.email))).all()
        return [{"email": email, "user_id": a.user_id, "balance_micro": a.balance_micro,
                 "ledger_micro": int(sums.get(a.user_id) or 0),
                 "agrees": a.balance_micro == int(sums.get(a.user_id) or 0)} for email, a in rows]
