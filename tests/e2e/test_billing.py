"""Credits end to end (docs/billing.md): a real server metering real gVisor sandboxes every
second, Stripe played by stripe-mock (its OpenAPI-validated API) and by webhook payloads these
tests sign with the server's webhook secret, exactly as Stripe signs them."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from e2a.billing.rates import MICRO, Rates, compute_cost
from e2a.config import Settings
from e2a.sdk import E2A
from tests import stripe_mock as sm
from tests.e2e import sessions
from tests.e2e.mailbox import sign_in
from tests.conftest import own_server, wait_for
from tests.e2e.server import STRIPE_WEBHOOK_SECRET

pytestmark = pytest.mark.e2e
RATES = Rates.from_settings(Settings())
STANDARD = RATES.rate_num(500, 512)


class Payer:
    """A user of its own (a fresh account: 100 free credits), over raw HTTP."""

    def __init__(self, server, tag: str):
        self.server = server
        self.email = f"{tag}-{uuid.uuid4().hex[:8]}@example.com"
        self.key = server.create_user(self.email)
        self.http = httpx.Client(base_url=server.url, timeout=60,
                                 headers={"Authorization": f"Bearer {self.key}"})

    def balance(self) -> int:
        r = self.http.get("/v1/billing/balance")
        assert r.status_code == 200, r.text
        return r.json()["credit_balance_micro"]

    def transactions(self, limit: int = 1000) -> list[dict]:
        r = self.http.get("/v1/billing/transactions", params={"limit": limit})
        assert r.status_code == 200, r.text
        return r.json()["transactions"]

    def charged(self, sandbox_id: str) -> int:
        return -sum(t["amount_micro"] for t in self.transactions()
                    if t["kind"] == "usage" and t["sandbox_id"] == sandbox_id)

    def grant(self, credits, reason: str = "test") -> None:
        self.server.admin("grant", "--reason", reason, "--", self.email, str(credits))

    def signed_in(self, mailbox) -> httpx.Client:
        """HTTP with the login JWT (signed in by a code mailed to the tests' SMTP server): what
        changing auto top-up takes."""
        token = sign_in(self.server.url, mailbox, self.email).token
        return httpx.Client(base_url=self.server.url, timeout=60,
                            headers={"Authorization": f"Bearer {token}"})

    def set_topup(self, mailbox, **body) -> httpx.Response:
        with self.signed_in(mailbox) as c:
            return c.put("/v1/billing/auto-topup", json=body)

    def set_balance(self, micro: int, reason: str = "set up the test") -> None:
        """An admin adjustment that brings the balance to `micro` micro-credits (as of now)."""
        self.grant(Decimal(micro - self.balance()) / MICRO, reason)

    def create(self, **body) -> dict:
        r = self.http.post("/v1/sandboxes", json={"template": "standard", **body})
        assert r.status_code == 201, r.text
        return r.json()

    def kill(self, vm_id: str) -> None:
        self.http.delete(f"/v1/sandboxes/{vm_id}")

    def close(self) -> None:
        for sb in self.http.get("/v1/sandboxes").json():
            self.kill(sb["vm_id"])
        self.http.close()


@pytest.fixture
def payer(server):
    p = Payer(server, "payer")
    yield p
    p.close()


def running_ms(http: httpx.Client, vm_id: str) -> int:
    """Milliseconds from the sandbox's start for its user to its destroy, from its event feed
    (the same times metering reads)."""
    events = http.get(f"/v1/sandboxes/{vm_id}/events").json()["events"]
    start = next(e["at"] for e in events if e["reason"] == "claimed" or
                 (e["to_state"] == "running" and e["from_state"] == "booting"))
    end = next(e["at"] for e in events if e["to_state"] == "destroyed")
    span = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return int(span / timedelta(milliseconds=1))


def exactly_charged(payer: Payer, vm_id: str) -> int:
    """Waits for the sandbox's last charge and returns what its whole life cost."""
    expected = compute_cost(running_ms(payer.http, vm_id), STANDARD)
    wait_for(lambda: payer.charged(vm_id) == expected, timeout=15)
    return expected


# ---------------------------------------------------------------------------- accounts' credits


def test_a_new_account_has_100_free_credits_from_one_grant(payer):
    assert payer.balance() == 100 * MICRO
    r = payer.http.get("/v1/billing/balance").json()
    assert r["credit_balance"] == 100
    [grant] = payer.transactions()
    assert (grant["kind"], grant["amount"]) == ("grant", 100)
    assert grant["id"].startswith("txn_")


def test_a_sandbox_kept_for_a_known_time_is_charged_exactly(payer):
    sb = payer.create()
    wait_for(lambda: payer.charged(sb["vm_id"]) > 0, timeout=10)  # charged while it runs
    time.sleep(2)
    payer.kill(sb["vm_id"])
    cost = exactly_charged(payer, sb["vm_id"])
    assert cost >= 2 * 925  # over two seconds at 0.000925 credits/s
    usage = [t for t in payer.transactions() if t["kind"] == "usage"]
    assert all(t["sandbox_id"] == sb["vm_id"] and t["amount"] <= 0 for t in usage)
    assert payer.balance() == 100 * MICRO - cost
    # later ticks charge nothing more for a destroyed sandbox
    n = len(usage)
    time.sleep(2.5)
    assert len([t for t in payer.transactions() if t["kind"] == "usage"]) == n


def test_usage_reports_what_was_charged_by_sandbox_template_and_day(payer):
    sb = payer.create()
    wait_for(lambda: payer.charged(sb["vm_id"]) > 0, timeout=10)
    payer.kill(sb["vm_id"])
    cost = exactly_charged(payer, sb["vm_id"])
    ms = running_ms(payer.http, sb["vm_id"])
    for group, key in (("sandbox", sb["vm_id"]), ("template", "standard"), ("day", None)):
        r = payer.http.get("/v1/usage", params={"group_by": group})
        assert r.status_code == 200, r.text
        body = r.json()
        [item] = body["items"]
        if key is not None:  # a day's key is the UTC date the ticks fell on
            assert item["key"] == key
        assert item["credits"] == pytest.approx(cost / MICRO, abs=1e-6)
        assert item["vcpu_seconds"] == pytest.approx(0.5 * ms / 1000, abs=0.01)
        assert item["gib_seconds"] == pytest.approx(0.5 * ms / 1000, abs=0.01)
        assert body["rates"] == {"vcpu_second": 0.0014, "gib_second": 0.00045,
                                 "workspace_gib_hour": 0.01}
    # a window that ends before the sandbox began holds nothing
    r = payer.http.get("/v1/usage", params={"to": "2026-01-01T00:00:00Z"})
    assert r.status_code == 200 and r.json()["items"] == []
    for bad in ({"group_by": "week"}, {"from": "yesterday"}, {"from": "2026-02-01",
                                                              "to": "2026-01-01"}):
        r = payer.http.get("/v1/usage", params=bad)
        assert r.status_code in (400, 422) and "error" in r.json(), (bad, r.text)


def test_users_never_see_each_others_ledger_or_usage(server, payer):
    other = Payer(server, "other")
    try:
        sb = payer.create()
        wait_for(lambda: payer.charged(sb["vm_id"]) > 0, timeout=10)
        payer.grant(7, "a reason only the payer may read")
        theirs = other.transactions()
        assert [t["kind"] for t in theirs] == ["grant"]
        assert other.http.get("/v1/usage", params={"group_by": "sandbox"}).json()["items"] == []
        assert other.balance() == 100 * MICRO
        assert "a reason only" not in json.dumps(theirs)
    finally:
        other.close()


def test_workspace_storage_is_charged_from_its_measured_size(server, payer):
    sb = payer.create(workspace={"app_id": "stored", "capset_id": "default"})
    ws = sb["workspace_id"]
    with E2A(server.url, payer.key) as c:
        c.files.write(sb["vm_id"], "/home/user/blob.bin", b"x" * (8 << 20))
    payer.kill(sb["vm_id"])  # flushed, then measured
    size = payer.http.get(f"/v1/workspaces/{ws}/usage").json()["bytes_used"]
    assert size >= 8 << 20
    def stored_entries():
        found = [t for t in payer.transactions()
                 if t["kind"] == "storage" and t["workspace_id"] == ws]
        return found if len(found) >= 2 else None
    entries = wait_for(stored_entries, timeout=20)  # two storage ticks
    assert all(t["sandbox_id"] is None and t["amount_micro"] <= 0 for t in entries)
    # the same entries through /v1/usage (up to the last one seen, as ticks go on meanwhile)
    last = max(datetime.fromisoformat(t["timestamp"]) for t in entries)
    usage = payer.http.get("/v1/usage", params={
        "group_by": "sandbox", "to": (last + timedelta(microseconds=1)).isoformat()}).json()
    [stored] = [i for i in usage["items"] if i["key"] == "workspaces"]
    # GiB-hours follow the measured size, and the credits the rate (0.01 per GiB-hour, charged
    # on the whole stored time, so rounded down once: within a micro-credit)
    seconds = sum(float(t["description"].split(" stored for ")[1].split(" s")[0])
                  for t in entries)
    assert stored["workspace_gib_hours"] == pytest.approx(size / 2**30 * seconds / 3600,
                                                          rel=0.01)
    charged = round(stored["credits"] * MICRO)
    assert abs(charged - int(stored["workspace_gib_hours"] * 10_000)) <= 1


# ---------------------------------------------------------------------------- running out


def test_a_balance_that_cannot_pay_the_first_minute_is_402(server, payer):
    payer.grant(-100, "spent elsewhere")
    assert payer.balance() == 0
    r = payer.http.post("/v1/sandboxes", json={"template": "standard"})
    assert r.status_code == 402, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_credits"
    assert "balance is 0 credits" in err["message"] and "costs 0.0555." in err["message"]
    r = payer.http.post("/v1/sessions", json={"user_id": "u1", "agent": {"kind": "deictic"},
                                              "llm": {"vendor": "anthropic",
                                                      "api_key": "sk-test-1234567890"}})
    assert r.status_code == 402, r.text
    assert r.json()["error"]["code"] == "insufficient_credits"
    assert payer.http.get("/v1/sandboxes").json() == []
    payer.grant("0.06", "enough for a minute")
    payer.kill(payer.create()["vm_id"])


def test_running_out_ends_the_users_sandboxes_after_flushing_their_workspace(server, payer):
    ws = {"app_id": "billing", "capset_id": "default"}
    sb = payer.create(workspace=ws, idle_timeout_seconds=600)
    keep = E2A(server.url, payer.key)
    keep.files.write(sb["vm_id"], "/home/user/kept.txt", "written before the money ran out")
    # below minus the grace (0.5 credits): the next tick ends it
    payer.set_balance(-600_000, "ran out")
    wait_for(lambda: payer.http.get(f"/v1/sandboxes/{sb['vm_id']}").json()["state"]
             == "destroyed", timeout=20)
    gone = payer.http.get(f"/v1/sandboxes/{sb['vm_id']}").json()
    assert gone["end_reason"] == "out_of_credits"
    assert payer.http.post("/v1/sandboxes", json={"template": "standard"}).status_code == 402
    payer.grant(10, "topped up by hand")
    again = payer.create(workspace=ws)
    assert keep.files.read_text(again["vm_id"], "/home/user/kept.txt") == \
        "written before the money ran out"
    keep.close()


def test_running_out_ends_a_session_with_out_of_credits(payer):
    ticket = sessions.create(payer.http, llm={"vendor": "anthropic", "model": sessions.MODEL,
                                              "api_key": "sk-ant-billing-" + uuid.uuid4().hex})
    conn = sessions.Conn(ticket)
    payer.set_balance(-600_000, "ran out")
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            conn.recv(30)
    assert closed.value.rcvd.code == 4000 and closed.value.rcvd.reason == "out_of_credits"
    got = payer.http.get(f"/v1/sessions/{ticket['chat_session_id']}").json()
    assert got["state"] == "ended" and got["end_reason"] == "out_of_credits"
    sb = payer.http.get(f"/v1/sandboxes/{got['vm_id']}").json()
    assert sb["state"] == "destroyed" and sb["end_reason"] == "out_of_credits"


# ---------------------------------------------------------------------------- purchases


def post_event(server, event: dict, secret: str = STRIPE_WEBHOOK_SECRET, **kw) -> httpx.Response:
    payload, headers = sm.signed(event, secret, **kw)
    return httpx.post(server.url + "/v1/billing/webhook", content=payload,
                      headers={**headers, "Content-Type": "application/json"}, timeout=30)


def checkout(payer: Payer, credits: int = 500) -> str:
    r = payer.http.post("/v1/billing/checkout", json={"credit_amount": credits})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["url"].startswith("http") and body["purchase_id"].startswith("pur_")
    return body["purchase_id"]


def user_id(payer: Payer) -> str:
    db = sqlite3.connect(payer.server.base / "data" / "e2a.db")
    try:
        return db.execute("select id from users where email = ?", (payer.email,)).fetchone()[0]
    finally:
        db.close()


def paid(payer: Payer, purchase: str, credits: int = 500, **kw) -> dict:
    return sm.checkout_session_completed(
        session_id=sm.new_id("cs_test"), purchase_id=purchase, user_id=user_id(payer),
        credits=credits, amount_total=credits, payment_intent=kw.pop("payment_intent", None)
        or sm.new_id("pi"), **kw)


def purchases(payer: Payer) -> list[dict]:
    return [t for t in payer.transactions() if t["kind"] == "purchase"]


def test_checkout_then_the_signed_webhook_grants_the_credits_once(server, payer):
    purchase = checkout(payer, 500)
    before = payer.balance()
    event = paid(payer, purchase)
    for _ in range(3):  # delivered again and again: one grant
        r = post_event(server, event)
        assert r.status_code == 200, r.text
    assert payer.balance() == before + 500 * MICRO
    # the same payment told by another event (Stripe sends both): still one grant
    r = post_event(server, sm.payment_intent_succeeded(
        payment_intent_id=event["data"]["object"]["payment_intent"], purchase_id=purchase,
        user_id=user_id(payer), credits=500, amount=500))
    assert r.status_code == 200
    # a failure or an expiry told after the payment changes nothing
    post_event(server, sm.checkout_session_expired(session_id=event["data"]["object"]["id"],
                                                   purchase_id=purchase, user_id=user_id(payer),
                                                   credits=500, amount_total=500))
    assert payer.balance() == before + 500 * MICRO
    [entry] = purchases(payer)
    assert entry["amount"] == 500
    # the card it was paid with is saved for auto top-up
    assert payer.http.get("/v1/billing/auto-topup").json()["payment_method_saved"] is True


def test_events_in_another_order_grant_once(server, payer):
    purchase = checkout(payer, 600)
    uid, pi = user_id(payer), sm.new_id("pi")
    before = payer.balance()
    post_event(server, sm.payment_intent_succeeded(payment_intent_id=pi, purchase_id=purchase,
                                                   user_id=uid, credits=600, amount=600))
    post_event(server, paid(payer, purchase, 600, payment_intent=pi))
    assert payer.balance() == before + 600 * MICRO
    assert len(purchases(payer)) == 1


def test_forged_stale_and_unsigned_webhooks_are_400_and_grant_nothing(server, payer):
    purchase = checkout(payer, 500)
    event = paid(payer, purchase)
    before = payer.balance()
    for response in (
            post_event(server, event, secret="whsec_not_the_servers"),
            post_event(server, event, timestamp=int(datetime.now().timestamp()) - 3600),
            httpx.post(server.url + "/v1/billing/webhook", json=event, timeout=30)):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_signature"
    # a replay of a real delivery with its body changed no longer matches its signature
    payload, headers = sm.signed(event, STRIPE_WEBHOOK_SECRET)
    tampered = payload.replace(b'"500"', b'"50000"')
    assert tampered != payload
    r = httpx.post(server.url + "/v1/billing/webhook", content=tampered, headers=headers)
    assert r.status_code == 400
    assert payer.balance() == before


def test_an_event_for_another_amount_grants_nothing(server, payer):
    purchase = checkout(payer, 500)
    before = payer.balance()
    event = sm.checkout_session_completed(
        session_id=sm.new_id("cs_test"), purchase_id=purchase, user_id=user_id(payer),
        credits=500, amount_total=5, payment_intent=sm.new_id("pi"))
    assert post_event(server, event).status_code == 200
    assert payer.balance() == before


def test_checkout_below_the_minimum_is_400_naming_the_field(payer):
    r = payer.http.post("/v1/billing/checkout", json={"credit_amount": 499})
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "credit_amount"
    assert "500" in r.json()["error"]["message"]


def test_fifty_concurrent_purchases_and_debits_keep_balance_equal_to_ledger(server, payer):
    sandboxes = [payer.create()["vm_id"] for _ in range(2)]  # debited every second meanwhile
    uid = user_id(payer)
    ids = [checkout(payer, 500) for _ in range(25)]
    events = [paid(payer, p) for p in ids]
    with ThreadPoolExecutor(16) as pool:  # each delivered twice, all at once
        codes = list(pool.map(lambda e: post_event(server, e).status_code, events + events))
    assert codes == [200] * 50
    for vm in sandboxes:
        payer.kill(vm)
    for vm in sandboxes:
        exactly_charged(payer, vm)
    assert len(purchases(payer)) == 25
    ledger = sum(t["amount_micro"] for t in payer.transactions())
    assert payer.balance() == ledger
    report = server.admin("balances")
    assert uid in report and "DISAGREES" not in report


# ---------------------------------------------------------------------------- auto top-up


def saved_card(server, payer: Payer) -> None:
    post_event(server, paid(payer, checkout(payer, 500)))
    assert payer.http.get("/v1/billing/auto-topup").json()["payment_method_saved"]


def topups(payer: Payer) -> list[tuple]:
    db = sqlite3.connect(payer.server.base / "data" / "e2a.db")
    try:
        return db.execute("select id, state, stripe_payment_intent_id from purchases where "
                          "user_id = ? and kind = 'auto_topup' order by created_at",
                          (user_id(payer),)).fetchall()
    finally:
        db.close()


def test_auto_topup_needs_a_saved_card_and_a_real_amount(payer, mailbox):
    with payer.signed_in(mailbox) as c:
        r = c.put("/v1/billing/auto-topup", json={"enabled": True, "threshold": 50,
                                                  "credit_amount": 500})
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_payment_method"
        r = c.put("/v1/billing/auto-topup", json={"enabled": True, "threshold": 50,
                                                  "credit_amount": 10})
        assert r.status_code == 400 and r.json()["error"]["field"] == "credit_amount"
    # the API key reads the settings but cannot change them
    r = payer.http.put("/v1/billing/auto-topup", json={"enabled": False})
    assert r.status_code == 401


def test_metering_triggers_auto_topup_and_the_payment_grants_once(server, payer, mailbox):
    saved_card(server, payer)
    # a balance a hair above the threshold: the running sandbox's next tick crosses it
    threshold = 600
    payer.set_balance(threshold * MICRO + 2000)
    r = payer.set_topup(mailbox, enabled=True, threshold=threshold, credit_amount=700)
    assert r.status_code == 200 and r.json()["enabled"]
    assert topups(payer) == []  # not below the threshold yet
    sb = payer.create()
    [(purchase, state, pi)] = wait_for(lambda: topups(payer), timeout=15)
    before = payer.balance()
    if state != "succeeded":  # Stripe answered "pending": its webhook tells the outcome
        post_event(server, sm.payment_intent_succeeded(
            payment_intent_id=pi, purchase_id=purchase, user_id=user_id(payer), credits=700,
            amount=700))
    wait_for(lambda: any(t["amount"] == 700 for t in purchases(payer)), timeout=10)
    assert payer.balance() >= before + 700 * MICRO - 10 * 925 * 10
    # delivered again: nothing more; and no second top-up (the balance is above again)
    post_event(server, sm.payment_intent_succeeded(
        payment_intent_id=pi or sm.new_id("pi"), purchase_id=purchase, user_id=user_id(payer),
        credits=700, amount=700))
    assert len([t for t in purchases(payer) if t["amount"] == 700]) == 1
    assert len(topups(payer)) == 1
    payer.kill(sb["vm_id"])


def test_a_failed_topup_is_shown_and_not_retried_until_saved_again(server, payer, mailbox):
    saved_card(server, payer)
    payer.set_balance(600 * MICRO + 2000)
    assert payer.set_topup(mailbox, enabled=True, threshold=600,
                           credit_amount=500).status_code == 200
    sb = payer.create()
    [(purchase, state, pi)] = wait_for(lambda: topups(payer), timeout=15)
    if state != "failed":
        post_event(server, sm.payment_intent_payment_failed(
            payment_intent_id=pi, purchase_id=purchase, user_id=user_id(payer), credits=500,
            amount=500, message="Your card was declined."))
    failure = wait_for(lambda: payer.http.get("/v1/billing/balance").json()["auto_topup"]
                       ["last_failure"], timeout=10)
    assert failure["message"]
    [shown] = [t for t in payer.transactions() if t["kind"] == "topup_failed"]
    assert shown["amount"] == 0 and "500" in shown["description"]
    # the balance stays below the threshold, ticks go on: no second charge
    time.sleep(3)
    assert len(topups(payer)) == 1
    # saving the settings again is the user's answer: one new attempt
    assert payer.set_topup(mailbox, enabled=True, threshold=600,
                           credit_amount=500).status_code == 200
    wait_for(lambda: len(topups(payer)) == 2, timeout=15)
    payer.kill(sb["vm_id"])


# ---------------------------------------------------------------------------- restarts


def test_metering_across_a_restart_and_a_sigkill_charges_exactly(tmp_path):
    with own_server("billing", E2A_STRIPE_SECRET_KEY="") as srv:  # no payments here
        srv.start()
        p = Payer(srv, "restart")
        try:
            sb = p.create(idle_timeout_seconds=600)
            wait_for(lambda: p.charged(sb["vm_id"]) > 0, timeout=10)
            srv.kill9()             # mid-run: whatever tick was under way is lost
            time.sleep(2)
            srv.start()             # adopted; the meter continues from the database
            wait_for(lambda: p.charged(sb["vm_id"]) > 2000, timeout=15)
            srv.stop()              # a clean stop: its last tick
            srv.start()
            p.kill(sb["vm_id"])
            exactly_charged(p, sb["vm_id"])
            # without Stripe settings, purchases are 501 and say why
            r = p.http.post("/v1/billing/checkout", json={"credit_amount": 500})
            assert r.status_code == 501
            assert r.json()["error"]["code"] == "payments_not_configured"
        finally:
            p.close()
            srv.stop()
