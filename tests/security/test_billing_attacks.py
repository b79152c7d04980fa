"""Attacks on credits and billing (docs/billing.md), against the shared test server (metering
every second, storage every 2 s, stripe-mock as Stripe, webhooks signed by these tests as Stripe
signs them) and, for the storage quota, a small server of this module's own.

Who attacks: a tenant with an API key (getting credits without paying, spending or reading
another tenant's, avoiding charges, making e2a charge a card in a loop, 5xx from the billing
routes); an anonymous client (the webhook); code inside a sandbox (outliving out_of_credits); a
local unprivileged user (the database, the keys, the Stripe secret in the server's environment).

Tests marked xfail(strict=True) are holes found open: they fail now and pass once fixed (their
reason says what the hole is). The others are attacks e2a stops, kept as regression tests."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import httpx
import pytest

from e2a.billing.rates import GIB, MICRO
from e2a.sdk import E2A
from tests import stripe_mock as sm
from tests.conftest import own_server, wait_for
from tests.e2e.mailbox import client
from tests.e2e.server import STRIPE_WEBHOOK_SECRET
from tests.e2e.test_billing import (RATES, Payer, checkout, paid, post_event, purchases,
                                    saved_card, user_id)
from tests.security.conftest import NOBODY, as_user

pytestmark = pytest.mark.e2e

MiB = 1 << 20
FIRST_MINUTE = 60 * RATES.per_second(500, 512)  # a standard sandbox's first minute: 55,500 µ
WEBHOOK = "/v1/billing/webhook"


@pytest.fixture
def payer(server):
    p = Payer(server, "bill-atk")
    yield p
    p.close()


@pytest.fixture
def other(server):
    p = Payer(server, "bill-other")
    yield p
    p.close()


def db_rows(server, query: str, *args) -> list[tuple]:
    """Rows of the server's database (root reads it; the API never shows these)."""
    db = sqlite3.connect(server.base / "data" / "e2a.db")
    try:
        return db.execute(query, args).fetchall()
    finally:
        db.close()


def purchase_rows(p: Payer, kind: str | None = None) -> list[tuple]:
    """(id, state, payment intent, credits, amount_cents) of the user's purchases, oldest first."""
    q = ("select id, state, stripe_payment_intent_id, credits, amount_cents from purchases "
         "where user_id = ?" + (" and kind = ?" if kind else "") + " order by created_at")
    return db_rows(p.server, q, user_id(p), *([kind] if kind else []))


def fresh(server, key: str) -> httpx.Client:
    """A client on a connection of its own (e2a drops the connection of a 500)."""
    return httpx.Client(base_url=server.url, timeout=60,
                        headers={"Authorization": f"Bearer {key}"})


# ================================================================ the webhook, anonymously


def test_unsigned_forged_and_oversized_webhooks_grant_nothing(server, payer):
    purchase = checkout(payer, 500)
    event = paid(payer, purchase)
    body, _ = sm.signed(event, STRIPE_WEBHOOK_SECRET)
    now = int(time.time())
    mac = sm.sign(body, STRIPE_WEBHOOK_SECRET, now).split("v1=")[1]
    url = server.url + WEBHOOK
    json_type = {"content-type": "application/json"}
    refused = {
        "no signature": (body, {}),
        "garbage header": (body, {"Stripe-Signature": "garbage"}),
        "another secret": (body, {"Stripe-Signature": sm.sign(body, "whsec_guessed")}),
        "another body's signature": (body, {"Stripe-Signature": sm.sign(b"{}",
                                                                         STRIPE_WEBHOOK_SECRET)}),
        "the right mac as v0": (body, {"Stripe-Signature": f"t={now},v0={mac}"}),
        "the right mac, another time": (body, {"Stripe-Signature": f"t={now + 1},v1={mac}"}),
        "timestamp only": (body, {"Stripe-Signature": f"t={now}"}),
        "signed, not UTF-8": (b"\xff" + body,
                              {"Stripe-Signature": sm.sign(b"\xff" + body, STRIPE_WEBHOOK_SECRET)}),
        "signed, not JSON": (b"{nope", {"Stripe-Signature": sm.sign(b"{nope",
                                                                     STRIPE_WEBHOOK_SECRET)}),
    }
    before = payer.balance()
    answers = []
    for name, (content, headers) in refused.items():
        r = httpx.post(url, content=content, headers={**json_type, **headers}, timeout=30)
        answers.append(r)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["code"] == "invalid_signature", (name, r.text)
    # A body over 1 MiB is refused before it is verified, even correctly signed, whether its
    # length is declared or it comes chunked.
    big = body + b" " * (2 * MiB)
    signature = {"Stripe-Signature": sm.sign(big, STRIPE_WEBHOOK_SECRET)}
    r = httpx.post(url, content=big, headers={**json_type, **signature}, timeout=30)
    assert r.status_code == 413, r.text
    answers.append(r)
    r = httpx.post(url, content=(big[i:i + 65536] for i in range(0, len(big), 65536)),
                   headers={**json_type, **signature}, timeout=30)
    assert r.status_code == 413, r.text
    answers.append(r)
    assert payer.balance() == before
    for r in answers:  # no secret in any refusal
        assert STRIPE_WEBHOOK_SECRET not in r.text and sm.TEST_SECRET_KEY not in r.text
        assert mac not in r.text
    # positive control: the genuine delivery grants
    assert post_event(server, event).status_code == 200
    assert payer.balance() == before + 500 * MICRO


# ================================================================ credits without paying


def test_signed_events_credit_only_the_purchases_owner_and_only_once(server, payer, other):
    me, them = user_id(payer), user_id(other)
    mine, theirs = checkout(payer, 500), checkout(other, 500)
    my_before, their_before = payer.balance(), other.balance()
    pi = sm.new_id("pi")
    # my purchase, told with the other user's metadata: the purchase's owner gets the credits
    assert post_event(server, sm.checkout_session_completed(
        session_id=sm.new_id("cs_test"), purchase_id=mine, user_id=them, credits=500,
        amount_total=500, payment_intent=pi)).status_code == 200
    # the same payment again: new event ids, every event type that says it was paid, metadata
    # claiming more credits
    for event in (
            sm.checkout_session_completed(session_id=sm.new_id("cs_test"), purchase_id=mine,
                                          user_id=me, credits=500, amount_total=500,
                                          payment_intent=pi),
            sm.checkout_session_async_payment_succeeded(
                session_id=sm.new_id("cs_test"), purchase_id=mine, user_id=me, credits=500,
                amount_total=500, meta=sm.metadata(mine, me, 1_000_000)),
            sm.payment_intent_succeeded(payment_intent_id=pi, purchase_id=mine, user_id=me,
                                        credits=1_000_000, amount=500)):
        assert post_event(server, event).status_code == 200
    assert payer.balance() == my_before + 500 * MICRO
    assert [t["amount"] for t in purchases(payer)] == [500]
    # another tenant's purchase id in an event carrying my user id: the credits are theirs
    assert post_event(server, sm.checkout_session_completed(
        session_id=sm.new_id("cs_test"), purchase_id=theirs, user_id=me, credits=500,
        amount_total=500, meta=sm.metadata(theirs, me, 500))).status_code == 200
    assert payer.balance() == my_before + 500 * MICRO
    assert other.balance() == their_before + 500 * MICRO


def test_unpaid_failed_and_mismatched_events_grant_nothing(server, payer):
    me = user_id(payer)
    before = payer.balance()
    unpaid, other_currency, other_amount = (checkout(payer, 500) for _ in range(3))
    events = [
        # a delayed payment method: complete, not paid; then its payment fails; then it expires
        sm.checkout_session_completed(session_id=sm.new_id("cs_test"), purchase_id=unpaid,
                                      user_id=me, credits=500, amount_total=500,
                                      payment_status="unpaid"),
        sm.event("checkout.session.async_payment_failed", sm.checkout_session(
            session_id=sm.new_id("cs_test"), purchase_id=unpaid, user_id=me, credits=500,
            amount_total=500, payment_status="unpaid")),
        sm.checkout_session_expired(session_id=sm.new_id("cs_test"), purchase_id=unpaid,
                                    user_id=me, credits=500, amount_total=500),
        sm.payment_intent_payment_failed(payment_intent_id=sm.new_id("pi"), purchase_id=unpaid,
                                         user_id=me, credits=500, amount=500),
        # paid, but in another currency, another amount, or an amount that is no integer
        sm.checkout_session_completed(session_id=sm.new_id("cs_test"),
                                      purchase_id=other_currency, user_id=me, credits=500,
                                      amount_total=500, currency="jpy"),
        sm.payment_intent_succeeded(payment_intent_id=sm.new_id("pi"),
                                    purchase_id=other_amount, user_id=me, credits=500, amount=499),
        sm.event("checkout.session.completed", {**sm.checkout_session(
            session_id=sm.new_id("cs_test"), purchase_id=other_amount, user_id=me, credits=500,
            amount_total=500), "amount_total": "500"}),
        # purchases that do not exist, or ids that are not purchases
        sm.checkout_session_completed(session_id=sm.new_id("cs_test"),
                                      purchase_id="pur_doesnotexist0000000", user_id=me,
                                      credits=500, amount_total=500),
        sm.checkout_session_completed(session_id=sm.new_id("cs_test"), purchase_id=me,
                                      user_id=me, credits=500, amount_total=500),
    ]
    for event in events:
        r = post_event(server, event)
        assert r.status_code == 200, r.text
    assert payer.balance() == before
    assert purchases(payer) == []


def test_odd_checkout_and_auto_topup_bodies_are_4xx_and_buy_nothing(payer, mailbox):
    bodies = ['{"credit_amount": -500}', '{"credit_amount": 0}', '{"credit_amount": 499}',
              '{"credit_amount": 1000001}', '{"credit_amount": 9223372036854775808}',
              '{"credit_amount": 1e400}', '{"credit_amount": NaN}', '{"credit_amount": 500.5}',
              '{"credit_amount": "5e2"}', '{"credit_amount": true}', '{"credit_amount": null}',
              '{"credit_amount": [500]}', '{"credit_amount": 500, "user_id": "usr_x"}',
              '{"credit_amount": 500, "currency": "jpy"}', '[]', '"500"', '{', '']
    for body in bodies:
        r = payer.http.post("/v1/billing/checkout", content=body,
                            headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and "error" in r.json(), (body, r.text)
    assert purchase_rows(payer) == []
    signed = payer.signed_in(mailbox)  # changing auto top-up takes the login token
    for body in ('{"enabled": true, "threshold": -1, "credit_amount": 500}',
                 '{"enabled": false, "threshold": 2147483648, "credit_amount": 500}',
                 '{"enabled": false, "threshold": 10, "credit_amount": 1e400}',
                 '{"enabled": false, "threshold": 10, "credit_amount": -1}',
                 '{"enabled": true, "threshold": 10, "credit_amount": 499}',
                 '{"enabled": false, "threshold": 10, "credit_amount": 500, "user_id": "usr_x"}',
                 '{"threshold": 10}', '[]'):
        r = signed.put("/v1/billing/auto-topup", content=body,
                       headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and "error" in r.json(), (body, r.text)
    signed.close()
    for params in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"offset": -1},
                   {"offset": 10**9 + 1}, {"limit": 10**30}, {"offset": "1e3"}):
        r = payer.http.get("/v1/billing/transactions", params=params)
        assert r.status_code == 400, (params, r.text)
    r = payer.http.get("/v1/billing/transactions", params={"offset": 10**9, "limit": 1000})
    assert r.status_code == 200 and r.json()["transactions"] == []
    for params in ({"group_by": "user"}, {"from": "yesterday"}, {"to": "2026-13-01"},
                   {"from": "2026-01-01T00:00:00+25:00"}, {"from": "x" * 41},
                   {"from": "2026-02-01", "to": "2026-01-01"}):
        r = payer.http.get("/v1/usage", params=params)
        assert r.status_code == 400, (params, r.text)
    assert payer.balance() == 100 * MICRO


# ================================================================ another tenant's billing


def test_another_tenants_ledger_usage_and_settings_are_out_of_reach(server, payer, other,
                                                                    mailbox):
    victim = user_id(payer)
    payer.grant(7, "a reason only the payer may read")
    checkout(payer, 500)
    assert payer.set_topup(mailbox, enabled=False, threshold=4242,
                           credit_amount=777).status_code == 200
    snooping = [
        other.http.get("/v1/billing/transactions", params={"user_id": victim, "limit": 1000}),
        other.http.get("/v1/billing/transactions", headers={"X-User-Id": victim}),
        other.http.get("/v1/usage", params={"user_id": victim, "group_by": "sandbox",
                                            "from": "1970-01-01"}),
        other.http.get("/v1/billing/balance", params={"user_id": victim}),
        other.http.get("/v1/billing/auto-topup", params={"user_id": victim}),
    ]
    for r in snooping:
        assert r.status_code == 200, r.text
        assert "a reason only" not in r.text and victim not in r.text
    assert [t["kind"] for t in snooping[0].json()["transactions"]] == ["grant"]
    assert [t["kind"] for t in snooping[1].json()["transactions"]] == ["grant"]
    assert snooping[2].json()["items"] == []
    assert snooping[3].json()["credit_balance_micro"] == 100 * MICRO
    assert snooping[4].json()["threshold"] == 0 and snooping[4].json()["credit_amount"] == 0
    for path in (f"/v1/billing/balance/{victim}", f"/v1/billing/transactions/{victim}",
                 f"/v1/billing/auto-topup/{victim}", f"/v1/usage/{victim}"):
        r = other.http.get(path)
        assert r.status_code in (401, 404, 405), (path, r.text)
    # the other tenant's settings cannot be written either: a user_id in the body is refused
    r = other.set_topup(mailbox, enabled=False, threshold=1, credit_amount=1, user_id=victim)
    assert r.status_code == 400
    assert payer.http.get("/v1/billing/auto-topup").json()["threshold"] == 4242
    # nothing of Stripe's (customer, card) is shown, not even to the owner
    mine = [payer.http.get(p).text for p in ("/v1/billing/balance", "/v1/billing/auto-topup",
                                              "/v1/billing/transactions")]
    assert not any(re.search(r"\b(cus|pm|pi|cs)_[A-Za-z0-9]", text) for text in mine)


# ================================================================ 5xx from the billing routes


def test_usage_window_at_the_ends_of_the_calendar_is_4xx(server, payer):
    for params in ({"to": "0001-01-01"}, {"to": "0001-01-15T00:00:00Z"},
                   {"from": "0001-01-01T00:00:00+01:00"}, {"to": "9999-12-31T23:59:59-01:00"}):
        with fresh(server, payer.key) as c:
            r = c.get("/v1/usage", params=params)
        assert r.status_code < 500, (params, r.status_code, r.text)


# ================================================================ avoiding charges: the 402 check


def test_a_balance_for_one_minute_does_not_start_a_second_sandbox(payer):
    payer.set_balance(FIRST_MINUTE * 3 // 2)
    payer.create(idle_timeout_seconds=60)
    r = payer.http.post("/v1/sandboxes", json={"template": "standard"})
    assert r.status_code == 402, (r.status_code, r.text)


def test_creates_at_once_at_the_edge_of_the_balance_start_one_sandbox(server, payer):
    payer.set_balance(FIRST_MINUTE + 1000)
    headers = {"Authorization": f"Bearer {payer.key}"}

    def create(_):
        return httpx.post(server.url + "/v1/sandboxes", headers=headers, timeout=120,
                          json={"template": "standard", "idle_timeout_seconds": 60}).status_code

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(create, range(4)))
    assert sorted(codes) == [201, 402, 402, 402], codes


# ================================================================ avoiding charges: sandbox code


def test_sandbox_code_and_sessions_do_not_outlive_out_of_credits(server, payer):
    """Root in the sandbox ignores every signal and keeps its workspace busy; a session runs
    beside it. Running out ends both (out_of_credits), and nothing new starts."""
    sb = payer.create(workspace={"app_id": "stubborn", "capset_id": "default"},
                      idle_timeout_seconds=600)
    with E2A(server.url, payer.key) as c:
        c.run_background(sb["vm_id"], "trap '' TERM HUP INT; for i in 1 2 3 4; do (trap '' TERM "
                         "HUP INT; while :; do head -c 1M /dev/urandom >> /home/user/f.$i; "
                         "truncate -s 0 /home/user/f.$i; done) & done; wait", user="root")
    r = payer.http.post("/v1/sessions", json={
        "user_id": "enduser", "agent": {"kind": "deictic"},
        "llm": {"vendor": "anthropic", "api_key": "sk-test-1234567890"}})
    assert r.status_code == 201, r.text
    session = r.json()["chat_session_id"]
    payer.set_balance(-600_000, "ran out")  # below minus the grace
    wait_for(lambda: payer.http.get(f"/v1/sandboxes/{sb['vm_id']}").json()["state"]
             == "destroyed", timeout=30)
    wait_for(lambda: payer.http.get(f"/v1/sessions/{session}").json()["state"] == "ended",
             timeout=30)
    assert payer.http.get(f"/v1/sandboxes/{sb['vm_id']}").json()["end_reason"] == "out_of_credits"
    assert payer.http.get(f"/v1/sessions/{session}").json()["end_reason"] == "out_of_credits"
    assert payer.http.get("/v1/sandboxes").json() == []
    assert payer.http.post(f"/v1/sandboxes/{sb['vm_id']}/keepalive").status_code == 409
    for path, body in (("/v1/sandboxes", {"template": "standard"}),
                       ("/v1/sandboxes", {"template": "standard",
                                          "workspace": {"app_id": "stubborn",
                                                        "capset_id": "default"}}),
                       ("/v1/sessions", {"user_id": "enduser", "agent": {"kind": "deictic"},
                                         "llm": {"vendor": "anthropic",
                                                 "api_key": "sk-test-1234567890"}})):
        r = payer.http.post(path, json=body)
        assert r.status_code == 402, (path, r.text)


# ================================================================ avoiding charges: storage


def storage_sizes_after(p: Payer, workspace_id: str, since: datetime) -> list[int]:
    """The sizes (bytes) the storage charges of the workspace posted after `since` were for,
    newest first (from each entry's "<GiB> GiB stored for <s> s")."""
    sizes = []
    for t in p.transactions():
        if (t["kind"] == "storage" and t["workspace_id"] == workspace_id
                and datetime.fromisoformat(t["timestamp"]) > since):
            sizes.append(round(float(re.search(r"([\d.]+) GiB stored", t["description"])[1]) * GIB))
    return sizes


def test_files_uploaded_with_a_presigned_put_are_billed(server, payer):
    sb = payer.create(workspace={"app_id": "presigned", "capset_id": "default"})
    wid = sb["workspace_id"]
    payer.kill(sb["vm_id"])
    counted = payer.http.get(f"/v1/workspaces/{wid}/usage").json()["bytes_used"]
    assert 0 < counted < MiB  # the home directory's few files: charged from now on
    r = payer.http.post(f"/v1/workspaces/{wid}/files/presign",
                        json={"path": "stored.bin", "method": "PUT", "size": 8 * MiB})
    assert r.status_code == 200, r.text
    assert httpx.put(r.json()["url"], content=os.urandom(8 * MiB), timeout=120).status_code == 200
    uploaded = datetime.now(timezone.utc)
    # two storage ticks later (every 2 s here): what were they charged for?
    sizes = wait_for(lambda: (lambda s: s if len(s) >= 2 else None)(
        storage_sizes_after(payer, wid, uploaded)), timeout=30)
    assert sizes[0] >= 8 * MiB, f"charged for {sizes[0]} bytes; {8 * MiB + counted} are stored"


@pytest.fixture(scope="module")
def small_quota_server():
    """A server of this module's own whose users may store 16 MiB of workspaces."""
    # (its own tag: xdist may run tests/e2e/test_billing.py's "billing" server on this worker
    # while this module-scoped one is up)
    with own_server("quota", E2A_WORKSPACE_QUOTA_MIB="16") as srv:
        srv.start()
        yield srv
        srv.stop()


def test_sized_presigned_puts_cannot_store_past_the_quota(small_quota_server):
    srv = small_quota_server
    p = Payer(srv, "quota")
    try:
        sb = p.create(workspace={"app_id": "quota", "capset_id": "default"})
        wid = sb["workspace_id"]
        p.kill(sb["vm_id"])
        wait_for(lambda: not p.http.get(f"/v1/workspaces/{wid}").json()["mounted"], timeout=30)
        stored = 0
        for name in ("one.bin", "two.bin", "three.bin"):
            r = p.http.post(f"/v1/workspaces/{wid}/files/presign",
                            json={"path": name, "method": "PUT", "size": 12 * MiB})
            if r.status_code == 507:
                break
            assert r.status_code == 200, r.text
            put = httpx.put(r.json()["url"], content=os.urandom(12 * MiB), timeout=120)
            assert put.status_code == 200
            stored += 12 * MiB
        usage = p.http.get(f"/v1/workspaces/{wid}/usage").json()
        assert usage["bytes_used"] <= usage["quota_bytes"], (
            f"{usage['bytes_used'] / MiB:.0f} MiB stored under a "
            f"{usage['quota_bytes'] / MiB:.0f} MiB quota through presigned PUTs")
    finally:
        p.close()


# ================================================================ making e2a charge a card


def deliver_paid_topups(server, p: Payer, delivered: set[str]) -> None:
    """Stripe saying "succeeded" for each auto top-up charge it answered (stripe-mock declines
    every off-session charge; a real card is charged)."""
    for pid, state, pi, credits, cents in purchase_rows(p, "auto_topup"):
        if pi and pid not in delivered:
            delivered.add(pid)
            assert post_event(server, sm.payment_intent_succeeded(
                payment_intent_id=pi, purchase_id=pid, user_id=user_id(p), credits=credits,
                amount=cents)).status_code == 200


def test_one_low_balance_does_not_start_a_chain_of_auto_topups(server, payer, mailbox):
    saved_card(server, payer)
    assert payer.set_topup(mailbox, enabled=True, threshold=1_000_000,
                           credit_amount=500).status_code == 200
    sb = payer.create(idle_timeout_seconds=600)
    delivered: set[str] = set()

    def six_ticks_later():
        deliver_paid_topups(server, payer, delivered)
        return len([t for t in payer.transactions()
                    if t["kind"] == "usage" and t["sandbox_id"] == sb["vm_id"]]) >= 6

    wait_for(six_ticks_later, timeout=60)
    charges = purchase_rows(payer, "auto_topup")
    assert len(charges) <= 1, f"{len(charges)} auto top-up charges in six metering ticks"


def test_saving_auto_topup_again_and_again_does_not_charge_again_and_again(server, payer,
                                                                          mailbox):
    saved_card(server, payer)
    payer.set_balance(500 * MICRO)
    signed = payer.signed_in(mailbox)
    for _ in range(10):
        seen = len(purchase_rows(payer, "auto_topup"))
        r = signed.put("/v1/billing/auto-topup", json={"enabled": True, "threshold": 600,
                                                       "credit_amount": 700})
        assert r.status_code == 200, r.text
        # if this save started a charge, let it settle (declined) before the next save
        for _ in range(20):
            rows = purchase_rows(payer, "auto_topup")
            if len(rows) > seen and all(row[1] != "pending" for row in rows):
                break
            time.sleep(0.1)
        time.sleep(0.1)
    signed.close()
    attempts = purchase_rows(payer, "auto_topup")
    assert len(attempts) <= 2, f"{len(attempts)} charges of a declining card for 10 saves"
    failure = payer.http.get("/v1/billing/auto-topup").json()["last_failure"]
    assert "24 hours" in failure["message"]  # the user is told why nothing more is tried


def test_an_api_key_alone_cannot_make_e2a_charge_the_saved_card(server, payer):
    saved_card(server, payer)
    r = payer.http.put("/v1/billing/auto-topup", json={"enabled": True, "threshold": 1_000_000,
                                                       "credit_amount": 1_000_000})
    assert r.status_code in (401, 403), (r.status_code, r.text)
    assert purchase_rows(payer, "auto_topup") == []


def test_one_tenant_cannot_open_checkouts_without_limit(payer):
    codes = [payer.http.post("/v1/billing/checkout", json={"credit_amount": 500}).status_code
             for _ in range(60)]
    assert 429 in codes, f"60 checkouts in a row: {sorted(set(codes))}"


def test_a_disputed_purchase_takes_its_credits_back(server, payer):
    before = payer.balance()
    purchase, pi = checkout(payer, 500), sm.new_id("pi")
    assert post_event(server, paid(payer, purchase, payment_intent=pi)).status_code == 200
    assert payer.balance() == before + 500 * MICRO
    now = int(time.time())
    dispute = sm.event("charge.dispute.created", {
        "id": sm.new_id("dp"), "object": "dispute", "amount": 500, "currency": "usd",
        "charge": sm.new_id("ch"), "payment_intent": pi, "created": now, "livemode": False,
        "reason": "fraudulent", "status": "needs_response", "is_charge_refundable": False,
        "metadata": {}, "balance_transactions": [],
        "evidence_details": {"due_by": now + 7 * 86400, "has_evidence": False,
                             "past_due": False, "submission_count": 0}})
    assert post_event(server, dispute).status_code == 200
    assert payer.balance() <= before, "the disputed credits are still spendable"
    assert payer.balance() == before
    redelivered = dict(dispute, id=sm.new_id("evt"))  # told again: taken back once
    assert post_event(server, redelivered).status_code == 200
    assert payer.balance() == before
    won = sm.event("charge.dispute.closed", dict(dispute["data"]["object"], status="won"))
    assert post_event(server, won).status_code == 200
    assert payer.balance() == before + 500 * MICRO
    # then refunded in two steps (Stripe's amount_refunded is the total so far)
    for total in (200, 500, 500):
        refunded = sm.event("charge.refunded", {
            "id": sm.new_id("ch"), "object": "charge", "amount": 500, "currency": "usd",
            "amount_refunded": total, "refunded": total == 500, "payment_intent": pi,
            "metadata": {}, "created": now, "livemode": False})
        assert post_event(server, refunded).status_code == 200
    assert payer.balance() == before
    kinds = [t["kind"] for t in payer.transactions()[:4]]
    assert kinds == ["refund", "refund", "refund", "refund"], kinds


# ================================================================ secrets: answers, log, host


def test_no_stripe_secret_or_login_code_in_answers_or_the_log(server, mailbox, payer):
    answers = [payer.http.post("/v1/billing/checkout", json={"credit_amount": 500})]
    saved_card(server, payer)
    payer.set_balance(500 * MICRO)
    answers.append(payer.set_topup(mailbox, enabled=True, threshold=600,
                                   credit_amount=500))  # declined by stripe-mock
    wait_for(lambda: payer.http.get("/v1/billing/balance").json()["auto_topup"]["last_failure"],
             timeout=30)
    answers += [payer.http.get(p) for p in ("/v1/billing/balance", "/v1/billing/transactions",
                                            "/v1/billing/auto-topup", "/v1/usage")]
    answers.append(httpx.post(server.url + WEBHOOK, content=b"{}",
                              headers={"Stripe-Signature": "t=1,v1=00"}))
    # a sign-in with a code (mailed here): the code is not logged
    email = f"bill-code-{uuid.uuid4().hex[:8]}@example.com"
    with client(server.url, "127.0.0.90") as c:
        since = mailbox.mark()
        assert c.post("/v1/auth/login", json={"email": email}).status_code == 200
        code = mailbox.mail(email, since).code
        ok = c.post("/v1/auth/verify-otp", json={"email": email, "code": code})
        assert ok.status_code == 200
    token = ok.json()["token"]
    with client(server.url, token=token) as c:
        answers += [c.get("/v1/billing/balance"), c.get("/v1/billing/transactions")]
    log = server.log_tail(50_000_000)
    for secret in (sm.TEST_SECRET_KEY, STRIPE_WEBHOOK_SECRET):
        assert secret not in log
        for r in answers:
            assert secret not in r.text and secret not in str(r.headers)
    assert token not in log
    assert not [line for line in log.splitlines() if code in line and email in line]
    assert "login code for" not in log


def test_local_user_reads_no_billing_data_nor_the_stripe_secret(server, payer):
    checkout(payer, 500)
    data = server.base / "data"
    for f in ("e2a.db", "e2a.db-wal", "e2a.db-shm", "secrets.key", "agent.key",
              "workspace.key"):
        path = data / f
        assert path.exists(), path
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
        r = as_user(NOBODY, "cat", str(path))
        assert r.returncode != 0 and "Permission denied" in r.stderr, (path, r)
    assert stat.S_IMODE(data.stat().st_mode) & 0o077 == 0
    # the Stripe secret key and webhook secret are in the server's environment only: not on
    # its command line (world-readable), and its environ is root's
    pid = server.proc.pid
    cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
    assert sm.TEST_SECRET_KEY.encode() not in cmdline
    assert STRIPE_WEBHOOK_SECRET.encode() not in cmdline
    r = as_user(NOBODY, "cat", f"/proc/{pid}/environ")
    assert r.returncode != 0 and sm.TEST_SECRET_KEY not in r.stdout, r
