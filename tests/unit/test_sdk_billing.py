"""Credits in the SDK (sync and async) and the CLI (`e2a credits ...`), against a fake e2a API
behind an httpx.MockTransport.

The fake answers with the shapes of e2a/api/billing.py (field for field, plus a field from a
newer server) and records every request, so tests check paths, queries, bodies and credentials.
Like the server, it reads credits with the API key or the login token, and saves auto top-up
with the login token only (from its fake sign-in, POST /v1/auth/login and /v1/auth/verify-otp).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import pathlib
import subprocess
import sys
from dataclasses import fields
from datetime import date, datetime, timedelta, timezone
from urllib.parse import parse_qsl

import httpx
import pytest
from click.testing import CliRunner

from e2a import cli
from e2a.sdk import (E2A, AsyncBilling, AsyncE2A, AutoTopup, Balance, Billing, Checkout, E2AError,
                     InsufficientCredits, Transaction, Usage, UsageItem)

KEY = "test-key"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c3JfbWUifQ.login"  # the login JWT of EMAIL, for CODE
EMAIL, CODE = "me@example.com", "123456"
API = "http://e2a.test"

SB = {"vm_id": "sb1", "state": "running", "template": "standard", "vcpu": 1, "cpu_fraction": 0.5,
      "memory_mib": 512, "internet": True, "metadata": {}, "idle_timeout_seconds": 60,
      "max_lifetime_seconds": 7200, "created_at": "2026-01-01T00:00:00Z",
      "expires_at": "2026-01-01T01:00:00Z", "destroyed_at": None, "end_reason": None,
      "workspace_id": None}

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def txn(n: int, kind: str = "usage", micro: int = -925_000, at: datetime | None = None, **kw) -> dict:
    """A TransactionOut as the route gives it."""
    return {"id": f"txn_{n:04d}", "amount": micro / 1e6, "amount_micro": micro,
            "description": f"entry {n}", "timestamp": (at or T0 + timedelta(seconds=n)).isoformat(),
            "kind": kind, "sandbox_id": "sbx_a" if kind == "usage" else None, "workspace_id": None,
            "field_from_the_future": 1, **kw}


def err(status: int, code: str, message: str, field: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "field": field}})


USAGE_ITEMS = [
    {"key": "sbx_a", "credits": 1.234567, "vcpu_seconds": 440.5, "gib_seconds": 440.5,
     "workspace_gib_hours": 0.0},
    {"key": "workspaces", "credits": 0.05, "vcpu_seconds": 0.0, "gib_seconds": 0.0,
     "workspace_gib_hours": 5.000123456},
]
RATES = {"vcpu_second": 0.0014, "gib_second": 0.00045, "workspace_gib_hour": 0.01}


class Fake:
    """httpx handler: the billing routes (and create, for the 402), with a ledger of its own."""

    def __init__(self):
        self.requests: list[dict] = []
        self.credentials: list[str] = []  # each request's bearer token, in the same order
        self.micro = 99_873_000
        # newest first, as the route orders them: 1 grant, then 44 usage entries
        self.ledger = [txn(n) for n in range(44, 0, -1)] + [txn(0, "grant", 100_000_000,
                                                               description="free credits")]
        self.topup = {"enabled": False, "threshold": 0, "credit_amount": 0,
                      "payment_method_saved": False, "last_failure": None}
        self.stripe = True
        self.arrivals: list[list[dict]] = []  # entries that arrive at the front after each page
        self.purchases = 0

    def api(self, method: str | None = None, path: str | None = None) -> list[dict]:
        return [r for r in self.requests if (method is None or r["method"] == method)
                and (path is None or r["path"] == path)]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        rec = {"method": request.method, "path": request.url.path,
               "query": dict(parse_qsl(request.url.query.decode())),
               "json": json.loads(body) if body else None}
        self.requests.append(rec)
        auth = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.credentials.append(auth)
        route = (request.method, request.url.path)
        if route == ("POST", "/v1/auth/login"):  # no credentials
            to = rec["json"]["email"].strip().lower()
            return httpx.Response(200, json={"email": to, "expires_in": 600, "message":
                                             f"a login code was sent to {to}; it expires in 10 minutes"})
        if route == ("POST", "/v1/auth/verify-otp"):
            if (rec["json"]["email"], rec["json"]["code"]) != (EMAIL, CODE):
                return err(401, "invalid_code", "wrong or expired code")
            return httpx.Response(200, json={"token": TOKEN, "user_id": "usr_me", "email": EMAIL})
        if route == ("PUT", "/v1/billing/auto-topup"):  # it charges the card: the login token only
            takes = {TOKEN}
        elif request.url.path.startswith(("/v1/billing/", "/v1/usage")):
            takes = {KEY, TOKEN}
        else:
            takes = {KEY}
        if auth not in takes:
            return err(401, "unauthorized", "this route takes the login token, not an API key"
                       if auth == KEY else "bad api key")
        if route in (("POST", "/v1/sandboxes"), ("POST", "/v1/sessions")):
            if self.micro < 55_500:
                return err(402, "insufficient_credits",
                           f"your balance is {self.micro / 1e6:g} credits; the first minute of a "
                           "standard sandbox costs 0.0555. Buy credits (POST /v1/billing/checkout) "
                           "or turn on auto top-up")
            return httpx.Response(201, json=SB)
        if route == ("GET", "/v1/billing/balance"):
            return httpx.Response(200, json={"credit_balance": self.micro / 1e6,
                                             "credit_balance_micro": self.micro,
                                             "auto_topup": self.topup, "field_from_the_future": 1})
        if route == ("GET", "/v1/billing/transactions"):
            limit, offset = int(rec["query"].get("limit", 20)), int(rec["query"].get("offset", 0))
            page = self.ledger[offset:offset + limit]
            if self.arrivals:
                self.ledger[:0] = self.arrivals.pop(0)
            return httpx.Response(200, json={"transactions": page})
        if route == ("GET", "/v1/usage"):
            q = rec["query"]
            if q.get("group_by", "day") not in ("sandbox", "template", "day"):
                return err(422, "invalid_request", "group_by: Input should be 'sandbox', 'template' "
                                                   "or 'day'", "group_by")
            items = [] if q.get("to", "").startswith("2020") else USAGE_ITEMS
            return httpx.Response(200, json={
                "from": "2026-02-01T00:00:00+00:00", "to": "2026-03-03T00:00:00+00:00",
                "group_by": q.get("group_by", "day"), "items": items,
                "total": {"credits": 1.284567 if items else 0, "vcpu_seconds": 440.5 if items else 0,
                          "gib_seconds": 440.5 if items else 0,
                          "workspace_gib_hours": 5.000123456 if items else 0},
                "rates": RATES})
        if route == ("POST", "/v1/billing/checkout"):
            if not self.stripe:
                return err(501, "payments_not_configured", "this e2a takes no payments "
                           "(E2A_STRIPE_SECRET_KEY is unset): credits come from the free grant and "
                           "from its administrators")
            n = rec["json"]["credit_amount"]
            if not 500 <= n <= 1_000_000:
                return err(400, "invalid_field", "credit_amount must be from 500 to 1000000 credits "
                           "(1 credit = 1 US cent)", "credit_amount")
            self.purchases += 1
            return httpx.Response(200, json={"url": f"https://checkout.stripe.test/c/pay/cs_{n}",
                                             "purchase_id": f"pur_{self.purchases}"})
        if route == ("GET", "/v1/billing/auto-topup"):
            return httpx.Response(200, json=self.topup)
        if route == ("PUT", "/v1/billing/auto-topup"):
            new = rec["json"]
            if new["enabled"] and not self.stripe:
                return err(501, "payments_not_configured", "this e2a takes no payments")
            if new["enabled"] and new["credit_amount"] < 500:
                return err(400, "invalid_field", "credit_amount must be at least 500 credits",
                           "credit_amount")
            if new["enabled"] and not self.topup["payment_method_saved"]:
                return err(409, "no_payment_method", "auto top-up charges the card saved by a "
                           "purchase: buy credits once through POST /v1/billing/checkout first")
            self.topup = {**self.topup, **new, "last_failure": None}
            return httpx.Response(200, json=self.topup)
        return err(404, "not_found", f"no route {request.method} {request.url.path}")


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
def client(fake):
    with E2A(API, KEY, transport=httpx.MockTransport(fake)) as c:
        yield c


def aclient(fake) -> AsyncE2A:
    return AsyncE2A(API, KEY, transport=httpx.MockTransport(fake))


# ====================================================================== SDK: reads


def test_balance_parses_every_field(client, fake):
    fake.topup = {"enabled": True, "threshold": 100, "credit_amount": 500, "payment_method_saved": True,
                  "last_failure": {"at": "2026-03-01T12:00:00+00:00", "message": "Your card was declined."}}
    b = client.billing.balance()
    assert isinstance(client.billing, Billing)
    assert fake.api()[-1] == {"method": "GET", "path": "/v1/billing/balance", "query": {}, "json": None}
    assert b == Balance(credit_balance=99.873, credit_balance_micro=99_873_000,
                        auto_topup=AutoTopup(enabled=True, threshold=100, credit_amount=500,
                                             payment_method_saved=True,
                                             last_failure={"at": "2026-03-01T12:00:00+00:00",
                                                           "message": "Your card was declined."}))
    assert b.to_dict()["auto_topup"]["last_failure"]["message"] == "Your card was declined."


def test_one_page_of_transactions(client, fake):
    rows = client.billing.transactions()
    assert fake.api()[-1]["query"] == {"limit": "20", "offset": "0"}
    assert len(rows) == 20 and all(isinstance(t, Transaction) for t in rows)
    assert rows[0] == Transaction(id="txn_0044", amount=-0.925, amount_micro=-925_000,
                                  description="entry 44", timestamp=(T0 + timedelta(seconds=44)).isoformat(),
                                  kind="usage", sandbox_id="sbx_a", workspace_id=None)
    rows = client.billing.transactions(limit=5, offset=42)
    assert fake.api()[-1]["query"] == {"limit": "5", "offset": "42"}
    assert [(t.id, t.kind, t.amount) for t in rows] == [("txn_0002", "usage", -0.925),
                                                        ("txn_0001", "usage", -0.925),
                                                        ("txn_0000", "grant", 100.0)]


def test_iter_transactions_pages_through_the_whole_ledger(client, fake):
    it = client.billing.iter_transactions(limit=10)
    n = len(fake.requests)
    assert len(fake.requests) == n  # lazy: nothing is sent before iteration
    ids = [t.id for t in it]
    assert ids == [f"txn_{i:04d}" for i in range(44, -1, -1)]
    pages = fake.api()[n:]
    assert [p["query"] for p in pages] == [{"limit": "10", "offset": str(o)} for o in (0, 10, 20, 30, 40)]
    # a ledger that is a whole number of pages: one more (empty) page says it ended
    fake.ledger = fake.ledger[:40]
    assert len(list(client.billing.iter_transactions(limit=10))) == 40
    assert fake.api()[-1]["query"] == {"limit": "10", "offset": "40"}


def test_entries_arriving_while_paging_neither_repeat_nor_push_one_out(client, fake):
    """Metering ticks add entries at the front while the pages are read: each pushes the older
    entries down, onto the next page. Every entry there at the start comes once, and some of a
    tick share one time (one INSERT): those are told apart by id."""
    tick = T0 + timedelta(minutes=5)
    shared = (T0 + timedelta(seconds=30)).isoformat()  # entries 30..28: three of one tick
    fake.ledger = [{**t, "timestamp": shared} if 28 <= int(t["id"][4:]) <= 30 else t for t in fake.ledger]
    before = [t["id"] for t in fake.ledger]
    fake.arrivals = [[txn(200 + i, at=tick) for i in range(4)],   # after page 1: 4 new
                     [txn(300 + i, at=tick + timedelta(seconds=1)) for i in range(12)],  # more than a page
                     [txn(400, at=tick + timedelta(seconds=2))]]
    got = [t.id for t in client.billing.iter_transactions(limit=10)]
    assert got == before


def test_usage_sends_the_window_and_parses_items_total_and_rates(client, fake):
    u = client.billing.usage()
    assert fake.api()[-1]["path"] == "/v1/usage" and fake.api()[-1]["query"] == {"group_by": "day"}
    assert isinstance(u, Usage)
    assert (u.start, u.end, u.group_by) == ("2026-02-01T00:00:00+00:00", "2026-03-03T00:00:00+00:00", "day")
    assert u.items == [UsageItem(**i) for i in USAGE_ITEMS]
    assert u.total == UsageItem(key="total", credits=1.284567, vcpu_seconds=440.5, gib_seconds=440.5,
                                workspace_gib_hours=5.000123456)
    assert u.rates == RATES
    body = json.loads(fake(httpx.Request("GET", API + "/v1/usage", headers={
        "authorization": f"Bearer {KEY}"})).content)
    assert u.to_dict() == body  # the route's own shape back, from and to included

    client.billing.usage("2026-02-01", "2026-03-01T12:00:00Z", group_by="sandbox")
    assert fake.api()[-1]["query"] == {"from": "2026-02-01", "to": "2026-03-01T12:00:00Z",
                                       "group_by": "sandbox"}
    client.billing.usage(date(2026, 2, 1), datetime(2026, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))),
                         "template")
    assert fake.api()[-1]["query"] == {"from": "2026-02-01", "to": "2026-03-01T12:00:00+02:00",
                                       "group_by": "template"}
    client.billing.usage(end=datetime(2026, 3, 1))  # naive: UTC to the server
    assert fake.api()[-1]["query"] == {"to": "2026-03-01T00:00:00", "group_by": "day"}
    n = len(fake.requests)
    with pytest.raises(E2AError) as e:
        client.billing.usage(start=1700000000)
    assert (e.value.status, e.value.code) == (0, "invalid_time") and len(fake.requests) == n
    with pytest.raises(E2AError) as e:
        client.billing.usage(group_by="week")
    assert (e.value.status, e.value.field) == (422, "group_by")


# ====================================================================== SDK: purchases and auto top-up


def test_checkout(client, fake):
    c = client.billing.checkout(500)
    req = fake.api()[-1]
    assert (req["method"], req["path"], req["json"]) == ("POST", "/v1/billing/checkout", {"credit_amount": 500})
    assert c == Checkout(url="https://checkout.stripe.test/c/pay/cs_500", purchase_id="pur_1")
    with pytest.raises(E2AError) as e:
        client.billing.checkout(499)
    assert (e.value.status, e.value.code, e.value.field) == (400, "invalid_field", "credit_amount")
    assert "from 500" in e.value.message
    fake.stripe = False
    with pytest.raises(E2AError) as e:
        client.billing.checkout(500)
    assert (e.value.status, e.value.code) == (501, "payments_not_configured")
    assert "E2A_STRIPE_SECRET_KEY is unset" in e.value.message
    assert type(e.value) is E2AError


def test_auto_topup_read_and_saved_whole(client, fake):
    assert client.billing.auto_topup() == AutoTopup()  # read with the API key
    assert fake.api()[-1]["path"] == "/v1/billing/auto-topup"
    with pytest.raises(E2AError) as e:  # saved with the login token only
        client.billing.set_auto_topup(False, 100, 500)
    assert (e.value.status, e.value.code) == (401, "unauthorized")
    with E2A(API, TOKEN, transport=httpx.MockTransport(fake)) as account:
        with pytest.raises(E2AError) as e:  # no card saved yet
            account.billing.set_auto_topup(True, 100, 500)
        assert (e.value.status, e.value.code) == (409, "no_payment_method")
        assert fake.api()[-1]["json"] == {"enabled": True, "threshold": 100, "credit_amount": 500}
        fake.topup["payment_method_saved"] = True
        n = len(fake.requests)
        t = account.billing.set_auto_topup(True, 100, 500)
        assert [r["method"] for r in fake.requests[n:]] == ["PUT"]  # all three given: no read first
        assert fake.credentials[n:] == [TOKEN]
        assert t == AutoTopup(enabled=True, threshold=100, credit_amount=500, payment_method_saved=True)
        # what is left out stays as saved (the PUT replaces all three: they are read first)
        n = len(fake.requests)
        t = account.billing.set_auto_topup(False)
        assert [r["method"] for r in fake.requests[n:]] == ["GET", "PUT"]
        assert fake.api("PUT")[-1]["json"] == {"enabled": False, "threshold": 100, "credit_amount": 500}
        account.billing.set_auto_topup(True, threshold=250)
        assert fake.api("PUT")[-1]["json"] == {"enabled": True, "threshold": 250, "credit_amount": 500}
        with pytest.raises(E2AError) as e:
            account.billing.set_auto_topup(True, credit_amount=10)
        assert (e.value.status, e.value.field) == (400, "credit_amount")


def test_402_is_insufficient_credits_an_e2a_error(client, fake):
    fake.micro = 0
    with pytest.raises(InsufficientCredits) as e:
        client.create_sandbox("standard")
    assert isinstance(e.value, E2AError)
    assert (e.value.status, e.value.code) == (402, "insufficient_credits")
    assert "your balance is 0 credits" in e.value.message and "0.0555" in e.value.message
    assert repr(e.value).startswith("InsufficientCredits(status=402, code='insufficient_credits'")
    with pytest.raises(InsufficientCredits):  # a session's sandbox as well
        client.create_session("u1", api_key="sk-test-1234567890")
    fake.micro = 55_500
    assert client.create_sandbox("standard").vm_id == "sb1"
    with pytest.raises(E2AError) as other:  # other errors keep the one class
        client.get_sandbox("nope")
    assert type(other.value) is E2AError


def test_billing_takes_whatever_credential_the_client_holds(fake):
    """The login JWT works as the key (the server takes either); a wrong one is a 401."""
    with E2A(API, "eyJ.login.jwt", transport=httpx.MockTransport(fake)) as c, pytest.raises(E2AError) as e:
        c.billing.balance()
    assert e.value.status == 401
    assert fake.requests[-1]["path"] == "/v1/billing/balance"


# ====================================================================== SDK: async, same shapes


def test_async_client_mirrors_the_sync_one(fake):
    async def go():
        async with aclient(fake) as c:
            assert isinstance(c.billing, AsyncBilling)
            assert (await c.billing.balance()).credit_balance_micro == 99_873_000
            rows = await c.billing.transactions(limit=3, offset=1)
            assert [t.id for t in rows] == ["txn_0043", "txn_0042", "txn_0041"]
            assert fake.api()[-1]["query"] == {"limit": "3", "offset": "1"}
            fake.arrivals = [[txn(500, at=T0 + timedelta(hours=1))]]
            ids = [t.id async for t in c.billing.iter_transactions(limit=7)]
            assert ids == [f"txn_{i:04d}" for i in range(44, -1, -1)]
            u = await c.billing.usage(date(2026, 2, 1), group_by="sandbox")
            assert fake.api()[-1]["query"] == {"from": "2026-02-01", "group_by": "sandbox"}
            assert [i.key for i in u.items] == ["sbx_a", "workspaces"] and u.total.credits == 1.284567
            assert (await c.billing.checkout(700)).purchase_id == "pur_1"
            with pytest.raises(E2AError) as e:  # an API key cannot save auto top-up
                await c.billing.set_auto_topup(False, 10, 500)
            assert e.value.status == 401
            async with AsyncE2A(API, TOKEN, transport=httpx.MockTransport(fake)) as account:
                with pytest.raises(E2AError) as e:
                    await account.billing.set_auto_topup(True, 10, 500)
                assert e.value.code == "no_payment_method"
                fake.topup["payment_method_saved"] = True
                assert (await account.billing.set_auto_topup(True, 10, 500)).enabled is True
                t = await account.billing.set_auto_topup(False)
            assert fake.api("PUT")[-1]["json"] == {"enabled": False, "threshold": 10, "credit_amount": 500}
            assert t == await c.billing.auto_topup()
            fake.micro = 1
            with pytest.raises(InsufficientCredits) as e:
                await c.create_sandbox()
            assert e.value.status == 402

    asyncio.run(go())


def test_sync_and_async_offer_the_same_billing_methods():
    names = ["balance", "transactions", "iter_transactions", "usage", "checkout", "auto_topup",
             "set_auto_topup"]
    assert {n for n in dir(Billing) if not n.startswith("_")} == set(names)
    assert {n for n in dir(AsyncBilling) if not n.startswith("_")} == set(names)
    for name in names:
        sync, async_ = (inspect.signature(getattr(cls, name)).parameters for cls in (Billing, AsyncBilling))
        assert list(sync.values()) == list(async_.values()), name
    assert inspect.isasyncgenfunction(AsyncBilling.iter_transactions)


def test_models_and_fake_match_the_routes():
    """The SDK's models hold exactly the routes' response fields, and so does the fake above."""
    from e2a.api import billing as routes

    pairs = [(Balance, routes.BalanceOut), (AutoTopup, routes.AutoTopupOut),
             (Transaction, routes.TransactionOut), (UsageItem, routes.UsageItem),
             (Checkout, routes.CheckoutOut)]
    for model, out in pairs:
        assert [f.name for f in fields(model)] == list(out.model_fields), model
    assert set(txn(1)) - {"field_from_the_future"} == set(routes.TransactionOut.model_fields)
    assert set(Fake().topup) == set(routes.AutoTopupOut.model_fields)
    # Usage: the route's "from"/"to" are start/end here; total is a UsageItem keyed "total"
    assert [f.name for f in fields(Usage)] == ["start", "end", "group_by", "items", "total", "rates"]
    assert [f.alias or n for n, f in routes.UsageOut.model_fields.items()] == [
        "from", "to", "group_by", "items", "total", "rates"]
    assert set(routes.UsageTotal.model_fields) == {f.name for f in fields(UsageItem)} - {"key"}
    assert set(routes.Rates.model_fields) == set(RATES)
    assert set(routes.AutoTopupIn.model_fields) == {"enabled", "threshold", "credit_amount"}
    assert set(routes.Checkout.model_fields) == {"credit_amount"}


# ====================================================================== CLI


@pytest.fixture
def cli_fake(fake, monkeypatch, tmp_path):
    """The CLI's clients, and its sign-in, talking to the fake through the mock transport."""
    transport = httpx.MockTransport(fake)

    class FakeE2A(E2A):
        def __init__(self, url, key):
            super().__init__(url, key, transport=transport)

        @classmethod
        def login(cls, email, base_url=None):
            return E2A.login(email, base_url, transport=transport)

        @classmethod
        def verify_otp(cls, email, code, base_url=None):
            return E2A.verify_otp(email, code, base_url, transport=transport)

    monkeypatch.setenv("E2A_URL", API)
    monkeypatch.setenv("E2A_API_KEY", KEY)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no saved credentials
    monkeypatch.setattr(cli, "E2A", FakeE2A)
    return fake


def run_cli(*args, input=None):
    return CliRunner().invoke(cli.main, list(args), input=input)


def test_cli_balance(cli_fake):
    r = run_cli("credits")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["Balance: 99.873 credits",
                                     "Auto top-up: off (no card saved: buying credits once saves one)"]
    cli_fake.micro = -12_345
    cli_fake.topup = {"enabled": True, "threshold": 1000, "credit_amount": 2500, "payment_method_saved": True,
                      "last_failure": {"at": "2026-03-01T12:00:00.123+00:00", "message": "Your card was declined."}}
    lines = run_cli("credits").stdout.splitlines()
    assert lines[0] == "Balance: -0.012345 credits"
    assert lines[1] == "Auto top-up: on: 2,500 credits whenever the balance falls below 1,000 (a card is saved)"
    assert lines[2].startswith("Last top-up failed at 2026-03-01 12:00:00 UTC: Your card was declined.;")
    data = json.loads(run_cli("credits", "--json").stdout)
    assert data["credit_balance_micro"] == -12_345 and data["auto_topup"]["threshold"] == 1000


def test_cli_transactions(cli_fake):
    r = run_cli("credits", "transactions", "--limit", "3")
    assert r.exit_code == 0, r.output
    assert cli_fake.api()[-1]["query"] == {"limit": "3", "offset": "0"}
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "KIND", "AMOUNT", "DESCRIPTION"]
    assert lines[1].split() == ["2026-03-01", "12:00:44", "usage", "-0.925", "entry", "44"]
    assert len(lines) == 4
    r = run_cli("credits", "transactions", "--offset", "44")
    assert r.stdout.splitlines()[1].split() == ["2026-03-01", "12:00:00", "grant", "100", "free", "credits"]
    assert cli_fake.api()[-1]["query"] == {"limit": "20", "offset": "44"}
    rows = json.loads(run_cli("credits", "transactions", "--limit", "2", "--json").stdout)
    assert [t["id"] for t in rows] == ["txn_0044", "txn_0043"] and rows[0]["amount_micro"] == -925_000
    assert run_cli("credits", "transactions", "--limit", "0").exit_code == 2
    assert run_cli("credits", "transactions", "--limit", "1001").exit_code == 2


def test_cli_usage(cli_fake):
    r = run_cli("credits", "usage", "--from", "2026-02-01", "--to", "2026-03-03", "--by", "sandbox")
    assert r.exit_code == 0, r.output
    assert cli_fake.api()[-1]["query"] == {"from": "2026-02-01", "to": "2026-03-03", "group_by": "sandbox"}
    lines = r.stdout.splitlines()
    assert lines[0] == "From 2026-02-01 00:00:00 to 2026-03-03 00:00:00 UTC"
    assert lines[1].split() == ["SANDBOX", "CREDITS", "VCPU-S", "GIB-S", "GIB-H"]
    assert lines[2].split() == ["sbx_a", "1.234567", "440.5", "440.5", "0"]
    assert lines[3].split() == ["workspaces", "0.05", "0", "0", "5"]
    assert lines[4].split() == ["TOTAL", "1.284567", "440.5", "440.5", "5"]
    r = run_cli("credits", "usage")
    assert r.exit_code == 0 and cli_fake.api()[-1]["query"] == {"group_by": "day"}
    assert r.stdout.splitlines()[1].split()[0] == "DAY"
    r = run_cli("credits", "usage", "--to", "2020-01-01")
    assert r.exit_code == 0 and r.stdout.splitlines()[1] == "Nothing spent in this window."
    assert json.loads(run_cli("credits", "usage", "--json").stdout)["total"]["credits"] == 1.284567
    assert run_cli("credits", "usage", "--by", "week").exit_code == 2


def test_cli_buy(cli_fake):
    r = run_cli("credits", "buy", "1500")
    assert r.exit_code == 0, r.output
    assert r.stdout == "https://checkout.stripe.test/c/pay/cs_1500\n"  # the URL alone on stdout
    assert "1,500 credits" in r.stderr and "pur_1" in r.stderr
    assert cli_fake.api()[-1]["json"] == {"credit_amount": 1500}
    r = run_cli("credits", "buy", "10")
    assert r.exit_code == 1 and r.stderr.startswith("error: invalid_field: credit_amount must be from 500")
    cli_fake.stripe = False
    r = run_cli("credits", "buy", "500")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == ("error: payments_not_configured: this e2a takes no payments (E2A_STRIPE_SECRET_KEY "
                        "is unset): credits come from the free grant and from its administrators\n")


SIGNED_IN = [f"Email: {EMAIL}", f"A login code was sent to {EMAIL}; it expires in 10 minutes.",
             f"Code: {CODE}"]  # the sign-in's prompts and notice, on stderr


def test_cli_auto_topup(cli_fake):
    topup = "/v1/billing/auto-topup"
    r = run_cli("credits", "auto-topup")  # showing them: the API key, no sign-in
    assert r.exit_code == 0 and [(q["method"], q["path"]) for q in cli_fake.requests] == [("GET", topup)]
    assert cli_fake.credentials == [KEY]
    assert r.stdout == "Auto top-up: off (no card saved: buying credits once saves one)\n"
    # changing them signs in (Email, then the mailed Code) and PUTs with the login token: the
    # fake, like the server, refuses the API key there
    n = len(cli_fake.requests)
    r = run_cli("credits", "auto-topup", "--enable", "--threshold", "100", "--amount", "500",
                input=f"{EMAIL}\n{CODE}\n")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == SIGNED_IN + [
        "error: no_payment_method: auto top-up charges the card saved by a purchase: buy credits once "
        "through POST /v1/billing/checkout first",
        "hint: buy credits once with `e2a credits buy CREDITS`: its card is the one auto top-up charges"]
    assert [(q["method"], q["path"]) for q in cli_fake.requests[n:]] == [
        ("GET", topup), ("POST", "/v1/auth/login"), ("POST", "/v1/auth/verify-otp"), ("PUT", topup)]
    assert cli_fake.credentials[n:] == [KEY, "", "", TOKEN]
    assert cli_fake.api("POST", "/v1/auth/verify-otp")[-1]["json"] == {"email": EMAIL, "code": CODE}
    cli_fake.topup["payment_method_saved"] = True
    r = run_cli("credits", "auto-topup", "--enable", "--threshold", "100", "--amount", "500",
                "--email", EMAIL, input=f"{CODE}\n")  # --email: only the code is asked
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == SIGNED_IN[1:]
    assert cli_fake.api("PUT")[-1]["json"] == {"enabled": True, "threshold": 100, "credit_amount": 500}
    assert cli_fake.credentials[-1] == TOKEN
    assert r.stdout == "Auto top-up: on: 500 credits whenever the balance falls below 100 (a card is saved)\n"
    # the address e2a login saved for this server is used; a wrong code is asked again
    cli._save_credentials({"url": API, "api_key": "e2a_live_saved", "key_id": "key_a", "email": EMAIL,
                           "user_id": "usr_me"})
    r = run_cli("credits", "auto-topup", "--threshold", "250", input=f"000000\n{CODE}\n")
    assert r.exit_code == 0, r.output
    assert "Email:" not in r.stderr and "That code is wrong or expired; try again" in r.stderr
    assert cli_fake.api("PUT")[-1]["json"] == {"enabled": True, "threshold": 250, "credit_amount": 500}
    r = run_cli("credits", "auto-topup", "--disable", "--json", input=f"{CODE}\n")
    assert cli_fake.api("PUT")[-1]["json"] == {"enabled": False, "threshold": 250, "credit_amount": 500}
    assert json.loads(r.stdout)["enabled"] is False  # stdout holds the JSON alone
    r = run_cli("credits", "auto-topup", "--enable", "--amount", "10", input=f"{CODE}\n")
    assert r.exit_code == 1 and "error: invalid_field: credit_amount must be at least 500" in r.stderr
    # no code given: nothing is saved
    n = len(cli_fake.api("PUT"))
    r = run_cli("credits", "auto-topup", "--enable", input="")
    assert r.exit_code == 1 and len(cli_fake.api("PUT")) == n


def test_cli_402_says_what_to_do(cli_fake):
    cli_fake.micro = 0
    r = run_cli("sandbox", "create")
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        "error: insufficient_credits: your balance is 0 credits; the first minute of a standard sandbox "
        "costs 0.0555. Buy credits (POST /v1/billing/checkout) or turn on auto top-up",
        "hint: see your balance with `e2a credits`; buy credits with `e2a credits buy CREDITS`"]


def test_credit_formatting_is_exact():
    assert cli._micro_credits(100_000_000) == "100"
    assert cli._micro_credits(1_234_567_890_001) == "1,234,567.890001"
    assert cli._micro_credits(-500_000) == "-0.5"
    assert cli._micro_credits(0) == "0"
    assert cli._credits(0.1 + 0.2) == "0.3"
    assert cli._credits(-0.000001) == "-0.000001"
    assert cli._amount(0.000123456) == "0.000123" and cli._amount(1234.5) == "1,234.5"


def test_credits_help_loads_no_server_module():
    """`e2a credits ...` stays a client command."""
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2A_")}
    env["PYTHONPATH"] = str(root)
    entry = "import sys; sys.argv[0] = 'e2a'; from e2a.cli import main; main()"
    for args in (["credits", "--help"], ["credits", "usage", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", entry, *args], cwd=root, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "e2a.cli" in imported
        assert not {n for n in imported if n.split(".")[0] in ("fastapi", "sqlalchemy", "stripe")
                    or n.startswith(("e2a.api", "e2a.billing", "e2a.store", "e2a.server_cli"))}
