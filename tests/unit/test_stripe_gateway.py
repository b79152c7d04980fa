"""The Stripe gateway (e2a/billing/stripe_gateway.py) against the real stripe-mock.

stripe-mock validates every request against Stripe's OpenAPI spec (an unknown or mistyped
parameter is a 400, which the gateway raises as StripeUnavailable), so each call that passes here
sends what Stripe accepts. It does not echo metadata, so a recorder between the gateway and
stripe-mock keeps each request to check what was sent; the same recorder answers with canned
Stripe responses for what stripe-mock never does (a decline, a 500, a succeeded charge).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import stripe

from e2a.billing.stripe_gateway import (CARD_UNUSABLE, NEEDS_CARDHOLDER, Charge, StripeGateway,
                                        StripeUnavailable, WebhookRejected)
from e2a.config import Settings
from tests import stripe_mock as sm
from tests.conftest import worker_index

SECRET = sm.TEST_WEBHOOK_SECRET


@pytest.fixture(scope="module")
def mock_url():
    with sm.running(12190 + worker_index()) as url:
        yield url


# ---- a recorder in front of stripe-mock --------------------------------------------------

@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0  # what was answered

    @property
    def form(self) -> dict[str, str]:
        """The form fields (POST) or query (GET), Stripe's bracket names, e.g.
        "metadata[e2a_user]"."""
        text = (self.body.decode() if self.method == "POST"
                else urllib.parse.urlsplit(self.path).query)
        return {k: v[0] for k, v in urllib.parse.parse_qs(text).items()}


class Recorder(ThreadingHTTPServer):
    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self.requests: list[Recorded] = []
        self.canned: list[tuple[int, dict]] = []  # answered in turn instead of stripe-mock

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        rec = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                       body)
        self.server.requests.append(rec)
        if self.server.canned:
            rec.status, answer = self.server.canned.pop(0)
            data = json.dumps(answer).encode()
        else:
            keep = ("authorization", "content-type", "idempotency-key", "stripe-version")
            r = httpx.request(self.command, self.server.upstream + self.path, content=body,
                              headers={k: v for k, v in rec.headers.items() if k in keep})
            rec.status, data = r.status_code, r.content
        self.send_response(rec.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _handle

    def log_message(self, *args):
        pass


@pytest.fixture
def rec(mock_url):
    server = Recorder(mock_url)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def call(base: str, method: str, *args, key: str = sm.TEST_SECRET_KEY, retries: int = 0,
         **kwargs):
    """One gateway call on a gateway of its own (its httpx client lives in this event loop)."""
    async def go():
        g = StripeGateway(key, SECRET, api_base=base, max_network_retries=retries)
        try:
            return await getattr(g, method)(*args, **kwargs)
        finally:
            await g.aclose()
    return asyncio.run(go())


CHECKOUT = dict(customer="cus_buyer", purchase_id="pur_abc123", user_id="usr_alice", credits=750,
                amount_cents=750, currency="USD", success_url="https://e2a.example/ok",
                cancel_url="https://e2a.example/cancel")
CHARGE = dict(customer="cus_buyer", payment_method="pm_saved", amount_cents=2000, currency="usd",
              purchase_id="pur_top1", user_id="usr_alice", credits=2000)


def pi(status: str, **fields) -> dict:
    return {"id": "pi_canned", "object": "payment_intent", "status": status, "amount": 2000,
            "currency": "usd", **fields}


# ---- stripe-mock itself ----------------------------------------------------------------------

def test_stripe_mock_refuses_what_stripe_would(mock_url):
    """The premise of this file: a parameter Stripe does not know is a 400 at stripe-mock."""
    async def go():
        client = stripe.StripeClient(sm.TEST_SECRET_KEY, http_client=stripe.HTTPXClient(),
                                     base_addresses={"api": mock_url}, max_network_retries=0)
        with pytest.raises(stripe.InvalidRequestError) as e:
            await client.v1.checkout.sessions.create_async(
                {"mode": "payment", "success_url": "https://x", "credits": 5})
        return e.value
    err = asyncio.run(go())
    assert err.http_status == 400
    assert "additional properties are not allowed" in err.user_message


# ---- customer ---------------------------------------------------------------------------------

def test_customer_created_with_the_user_in_metadata(rec):
    first = call(rec.url, "customer", "usr_alice", "alice@example.com", None)
    second = call(rec.url, "customer", "usr_bob", "bob@example.com")
    assert first.startswith("cus_") and second.startswith("cus_")
    assert first != second  # stripe-mock makes a fresh id per create
    r = rec.requests[0]
    assert (r.method, r.path, r.status) == ("POST", "/v1/customers", 200)
    assert r.form == {"email": "alice@example.com", "metadata[e2a_user]": "usr_alice"}
    assert r.headers["authorization"] == f"Bearer {sm.TEST_SECRET_KEY}"
    # one Customer even if two first purchases race, but per user and email
    assert r.headers["idempotency-key"].startswith("e2a-customer-usr_alice-")
    assert rec.requests[1].headers["idempotency-key"].startswith("e2a-customer-usr_bob-")


def test_existing_customer_is_used_without_asking_stripe(rec):
    assert call(rec.url, "customer", "usr_alice", "alice@example.com", "cus_known") == "cus_known"
    assert rec.requests == []


# ---- checkout -------------------------------------------------------------------------------

def test_checkout_returns_the_session_and_its_url(rec):
    session_id, url = call(rec.url, "checkout", **CHECKOUT)
    assert session_id.startswith("cs_test_")
    assert url.startswith("https://checkout.stripe.com/")
    [r] = rec.requests
    assert (r.method, r.path, r.status) == ("POST", "/v1/checkout/sessions", 200)
    assert r.headers["idempotency-key"] == "pur_abc123"
    meta = {"e2a_purchase": "pur_abc123", "e2a_user": "usr_alice", "credits": "750"}
    assert r.form == {
        "mode": "payment",
        "customer": "cus_buyer",
        "client_reference_id": "pur_abc123",
        "success_url": "https://e2a.example/ok",
        "cancel_url": "https://e2a.example/cancel",
        "line_items[0][quantity]": "1",
        "line_items[0][price_data][currency]": "usd",
        "line_items[0][price_data][unit_amount]": "750",
        "line_items[0][price_data][product_data][name]": "750 e2a credits",
        "payment_intent_data[setup_future_usage]": "off_session",
        **{f"payment_intent_data[metadata][{k}]": v for k, v in meta.items()},
        **{f"metadata[{k}]": v for k, v in meta.items()},
    }


def test_checkout_sessions_differ_and_work_without_a_customer(rec):
    a, _ = call(rec.url, "checkout", **CHECKOUT)
    b, _ = call(rec.url, "checkout", **{**CHECKOUT, "customer": None, "purchase_id": "pur_2"})
    assert a != b
    assert rec.requests[1].status == 200 and "customer" not in rec.requests[1].form


def test_checkout_without_a_url_is_an_error(rec):
    rec.canned.append((200, {"id": "cs_test_x", "object": "checkout.session", "url": None}))
    with pytest.raises(StripeUnavailable, match="without a URL"):
        call(rec.url, "checkout", **CHECKOUT)


# ---- payment_method_of --------------------------------------------------------------------------

def test_payment_method_of(rec):
    assert call(rec.url, "payment_method_of", "pi_paid").startswith("pm_")
    [r] = rec.requests
    assert (r.method, urllib.parse.urlsplit(r.path).path, r.status) == (
        "GET", "/v1/payment_intents/pi_paid", 200)
    assert r.form == {"expand[0]": "payment_method"}
    rec.canned.append((200, pi("succeeded", payment_method="pm_plain")))
    assert call(rec.url, "payment_method_of", "pi_canned") == "pm_plain"
    rec.canned.append((200, pi("requires_payment_method", payment_method=None)))
    assert call(rec.url, "payment_method_of", "pi_canned") is None


# ---- charge -----------------------------------------------------------------------------------

def test_charge_sends_an_off_session_confirmed_payment_intent(rec):
    result = call(rec.url, "charge", **CHARGE)
    # stripe-mock's PaymentIntent is always "requires_payment_method": a charge there fails
    assert result.status == "failed" and result.message == NEEDS_CARDHOLDER
    assert result.payment_intent_id.startswith("pi_")
    [r] = rec.requests
    assert (r.method, r.path, r.status) == ("POST", "/v1/payment_intents", 200)
    assert r.headers["idempotency-key"] == "pur_top1"
    assert r.form == {
        "amount": "2000", "currency": "usd", "customer": "cus_buyer",
        "payment_method": "pm_saved", "confirm": "true", "off_session": "true",
        "automatic_payment_methods[enabled]": "true",
        "automatic_payment_methods[allow_redirects]": "never",
        "description": "2000 e2a credits (auto top-up)",
        "metadata[e2a_purchase]": "pur_top1", "metadata[e2a_user]": "usr_alice",
        "metadata[credits]": "2000",
    }


@pytest.mark.parametrize("answer, expected", [
    (pi("succeeded"), Charge("succeeded", "pi_canned")),
    (pi("processing"), Charge("pending", "pi_canned")),
    (pi("requires_action"), Charge("failed", "pi_canned", NEEDS_CARDHOLDER)),
    (pi("requires_payment_method",
        last_payment_error={"type": "card_error", "message": "Your card has expired."}),
     Charge("failed", "pi_canned", "Your card has expired.")),
])
def test_charge_status(rec, answer, expected):
    rec.canned.append((200, answer))
    assert call(rec.url, "charge", **CHARGE) == expected


def test_declined_charge_fails_with_the_cardholders_message(rec):
    rec.canned.append((402, {"error": {
        "type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
        "message": "Your card has insufficient funds.",
        "payment_intent": pi("requires_payment_method", id="pi_declined")}}))
    assert call(rec.url, "charge", **CHARGE) == Charge(
        "failed", "pi_declined", "Your card has insufficient funds.")


def test_charge_on_a_card_stripe_no_longer_has_fails(rec):
    rec.canned.append((400, {"error": {
        "type": "invalid_request_error", "code": "resource_missing", "param": "payment_method",
        "message": "No such PaymentMethod: 'pm_saved'"}}))
    assert call(rec.url, "charge", **CHARGE) == Charge("failed", None, CARD_UNUSABLE)


def test_retried_charge_keeps_its_idempotency_key(rec):
    """A 500 is retried by the library with the same key: Stripe then charges at most once."""
    rec.canned += [(500, {"error": {"type": "api_error", "message": "boom"}}),
                   (200, pi("succeeded"))]
    assert call(rec.url, "charge", retries=1, **CHARGE) == Charge("succeeded", "pi_canned")
    assert [r.headers["idempotency-key"] for r in rec.requests] == ["pur_top1", "pur_top1"]


# ---- Stripe unavailable -----------------------------------------------------------------------

def test_unreachable_stripe(rec):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    for method, kwargs in [("checkout", CHECKOUT), ("charge", CHARGE)]:
        with pytest.raises(StripeUnavailable, match="could not reach Stripe"):
            call(closed, method, **kwargs)
    with pytest.raises(StripeUnavailable, match="could not reach Stripe"):
        call(closed, "customer", "usr_alice", "alice@example.com")


@pytest.mark.parametrize("status, error, words", [
    (500, {"type": "api_error", "message": "boom"}, "Stripe failed (500)"),
    (429, {"type": "invalid_request_error", "code": "rate_limit", "message": "slow"},
     "rate-limiting"),
    (403, {"type": "invalid_request_error", "message": "no"}, "may not do this (403)"),
])
def test_stripe_errors_are_unavailable_also_for_charges(rec, status, error, words):
    rec.canned.append((status, {"error": error}))
    with pytest.raises(StripeUnavailable) as e:
        call(rec.url, "charge", **CHARGE)
    assert words in e.value.message


def test_refused_key_never_shows_in_the_error_nor_the_log(mock_url, caplog):
    """stripe-mock's 401 quotes the Authorization header; none of it may come out."""
    key = "sk_live_topsecretvalue42"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StripeUnavailable) as e:
        call(mock_url, "customer", "usr_alice", "alice@example.com", key=key)
    assert e.value.message == "Stripe refused the secret key (401)"
    assert e.value.__cause__ is None and e.value.__context__ is None
    # nor in the library's own log lines (its INFO line quotes Stripe's error message)
    assert "topsecret" not in caplog.text and "topsecret" not in repr(e.value)
    assert "Authorization was 'Bearer [key]'" in caplog.text
    assert "Stripe refused the secret key (401)" in caplog.text


def test_rejected_request_names_the_problem_without_the_key(rec):
    rec.canned.append((400, {"error": {
        "type": "invalid_request_error", "message": f"Bad key {sm.TEST_SECRET_KEY} for mode"}}))
    with pytest.raises(StripeUnavailable) as e:
        call(rec.url, "checkout", **CHECKOUT)
    assert e.value.message == "Stripe refused the request (400): Bad key [key] for mode"


# ---- settings ---------------------------------------------------------------------------------

def test_from_settings(mock_url):
    assert StripeGateway.from_settings(Settings(stripe_secret_key="")) is None
    settings = Settings(stripe_secret_key=sm.TEST_SECRET_KEY, stripe_webhook_secret=SECRET,
                        stripe_api_base=mock_url + "/")

    async def go():
        g = StripeGateway.from_settings(settings)
        try:
            return await g.customer("usr_alice", "alice@example.com")
        finally:
            await g.aclose()
    assert asyncio.run(go()).startswith("cus_")


# ---- webhooks ---------------------------------------------------------------------------------

@pytest.fixture
def gw():
    return StripeGateway(sm.TEST_SECRET_KEY, SECRET)


def completed() -> dict:
    return sm.checkout_session_completed(
        session_id="cs_test_1", purchase_id="pur_abc123", user_id="usr_alice", credits=750,
        amount_total=750, customer="cus_buyer", payment_intent="pi_1", event_id="evt_1")


def test_sign_is_stripes_own_signature():
    body = b'{"id": "evt_1"}'
    assert sm.sign(body, SECRET, 1700000000) == \
        stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET, 1700000000)


def test_signed_event_is_accepted(gw):
    sent = completed()
    body, headers = sm.signed(sent, SECRET)
    event = gw.parse_webhook(body, headers["Stripe-Signature"])
    assert event == sent  # the JSON as sent, as plain dicts
    assert (event["id"], event["type"]) == ("evt_1", "checkout.session.completed")
    session = event["data"]["object"]
    assert (session["id"], session["payment_status"], session["amount_total"],
            session["currency"], session["client_reference_id"], session["payment_intent"],
            session["customer"]) == ("cs_test_1", "paid", 750, "usd", "pur_abc123", "pi_1",
                                     "cus_buyer")
    assert session.get("metadata") == {"e2a_purchase": "pur_abc123", "e2a_user": "usr_alice",
                                       "credits": "750"}
    # a str body too, and one signed 299 s ago (the tolerance is 300 s)
    body, headers = sm.signed(completed(), SECRET, int(time.time()) - 299)
    assert gw.parse_webhook(body.decode(), headers["Stripe-Signature"])["id"] == "evt_1"


def rejected(gw, body, header) -> str:
    with pytest.raises(WebhookRejected) as e:
        gw.parse_webhook(body, header)
    return e.value.message


def test_forged_body_is_rejected(gw):
    body, headers = sm.signed(completed(), SECRET)
    forged = body.replace(b'"amount_total": 750', b'"amount_total": 75000')
    assert forged != body
    assert "bad signature" in rejected(gw, forged, headers["Stripe-Signature"])


def test_other_secret_is_rejected(gw):
    body, headers = sm.signed(completed(), "whsec_someoneelse")
    assert "bad signature" in rejected(gw, body, headers["Stripe-Signature"])


def test_stale_signature_is_rejected(gw):
    body, headers = sm.signed(completed(), SECRET, int(time.time()) - 301)
    assert "tolerance" in rejected(gw, body, headers["Stripe-Signature"])


def test_missing_or_malformed_header_is_rejected(gw):
    body, _ = sm.signed(completed(), SECRET)
    assert rejected(gw, body, None) == "missing Stripe-Signature header"
    assert rejected(gw, body, "") == "missing Stripe-Signature header"
    assert "bad signature" in rejected(gw, body, "nonsense")
    t = int(time.time())
    assert "bad signature" in rejected(gw, body, f"t={t}")  # no v1


def test_signed_non_event_bodies_are_rejected(gw):
    for body, message in [(b"not json {", "the body is not JSON"),
                          (b"\xff\xfe", "the body is not UTF-8"),
                          (b"[1, 2]", "the body is not a Stripe event"),
                          (b'{"object": "charge", "id": "ch_1"}',
                           "the body is not a Stripe event")]:
        assert rejected(gw, body, sm.sign(body, SECRET)) == message


def test_no_webhook_secret_rejects_everything():
    body, headers = sm.signed(completed(), SECRET)
    gw = StripeGateway(sm.TEST_SECRET_KEY, "")
    assert rejected(gw, body, headers["Stripe-Signature"]) == "no webhook secret is configured"


def test_every_event_builder_parses(gw):
    ids = dict(purchase_id="pur_9", user_id="usr_bob", credits=900)
    events = [
        sm.checkout_session_completed(session_id="cs_9", amount_total=900,
                                      payment_status="unpaid", **ids),
        sm.checkout_session_async_payment_succeeded(session_id="cs_9", amount_total=900, **ids),
        sm.checkout_session_expired(session_id="cs_9", amount_total=900, **ids),
        sm.payment_intent_succeeded(payment_intent_id="pi_9", amount=900, customer="cus_b",
                                    payment_method="pm_b", **ids),
        sm.payment_intent_payment_failed(payment_intent_id="pi_9", amount=900,
                                         message="Your card was declined.", **ids),
    ]
    parsed = [gw.parse_webhook(*_body_and_header(e)) for e in events]
    assert [e["type"] for e in parsed] == [
        "checkout.session.completed", "checkout.session.async_payment_succeeded",
        "checkout.session.expired", "payment_intent.succeeded", "payment_intent.payment_failed"]
    assert len({e["id"] for e in parsed}) == 5
    assert all(e["id"].startswith("evt_") and e["object"] == "event" for e in parsed)
    objs = [e["data"]["object"] for e in parsed]
    assert [o["metadata"]["e2a_purchase"] for o in objs] == ["pur_9"] * 5
    assert [o["object"] for o in objs] == ["checkout.session"] * 3 + ["payment_intent"] * 2
    assert [(o["status"], o["payment_status"]) for o in objs[:3]] == [
        ("complete", "unpaid"), ("complete", "paid"), ("expired", "unpaid")]
    assert objs[0]["payment_intent"].startswith("pi_") and objs[2]["payment_intent"] is None
    assert (objs[3]["status"], objs[3]["amount_received"], objs[3]["payment_method"]) == (
        "succeeded", 900, "pm_b")
    assert objs[4]["status"] == "requires_payment_method"
    assert objs[4]["last_payment_error"]["message"] == "Your card was declined."


def _body_and_header(event: dict) -> tuple[bytes, str]:
    body, headers = sm.signed(event, SECRET)
    return body, headers["Stripe-Signature"]
