"""Stripe for the tests: stripe-mock (built by `make stripe-mock`) to call, and signed webhook
events to deliver.

stripe-mock checks each request against Stripe's OpenAPI spec but answers from fixtures: fresh
ids, no metadata echoed, every PaymentIntent "requires_payment_method" (the module docstring of
e2a/billing/stripe_gateway.py has the details). So what Stripe would *tell* e2a afterwards, the
tests build here and deliver themselves, signed with the webhook secret as Stripe signs them:

    event = checkout_session_completed(session_id=..., purchase_id=..., user_id=..., ...)
    body, headers = signed(event, "whsec_test")
    http.post(<the server's Stripe webhook route>, content=body, headers=headers)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import stripe

VERSION = "v0.203.0"  # scripts/build-stripe-mock.sh
API_VERSION = stripe.api_version  # the version e2a's stripe library speaks (and events carry)
TEST_SECRET_KEY = "sk_test_e2a"   # stripe-mock takes any sk_test_<one word>
TEST_WEBHOOK_SECRET = "whsec_e2atestsecret"


def binary() -> Path:
    cache = Path(os.environ.get("E2A_CACHE_DIR") or "/var/cache/e2a")
    return cache / "bin" / f"stripe-mock-{VERSION}"


@contextlib.contextmanager
def running(port: int, timeout: float = 20) -> Iterator[str]:
    """stripe-mock serving HTTP on 127.0.0.1:<port> until the block ends; yields its base URL
    (for E2A_STRIPE_API_BASE)."""
    path = binary()
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{path} is missing: run `make stripe-mock`")
    # -http-addr alone still opens HTTPS on :12112 (v0.203.0's options only drop HTTPS for
    # -http/-http-port/-http-unix), which would take another worker's port: HTTPS goes to a
    # free loopback port nobody uses instead. It logs every request to stdout: kept in a file,
    # shown if it fails to start.
    out = tempfile.TemporaryFile()
    proc = subprocess.Popen([str(path), "-http-addr", f"127.0.0.1:{port}",
                             "-https-addr", "127.0.0.1:0"],
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(proc, port, timeout, out)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
        out.close()


def _wait_until_up(proc: subprocess.Popen, port: int, timeout: float, out) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            out.seek(0)
            raise RuntimeError(f"stripe-mock exited ({proc.returncode}): "
                               f"{out.read().decode(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"stripe-mock did not listen on port {port} within {timeout} s")


# ---- webhook signatures ------------------------------------------------------------------

def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header Stripe sends with `payload`: t=<unix time>,v1=<hex
    HMAC-SHA256 of "<t>.<payload>" keyed by the endpoint's secret>."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def signed(event: dict, secret: str, timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers of Stripe's POST delivering `event` (Stripe pretty-prints it)."""
    body = json.dumps(event, indent=2).encode()
    return body, {"Content-Type": "application/json; charset=utf-8",
                  "Stripe-Signature": sign(body, secret, timestamp)}


# ---- events, shaped as Stripe sends them ---------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def metadata(purchase_id: str, user_id: str, credits: int) -> dict[str, str]:
    """What e2a puts on its sessions and PaymentIntents (billing/stripe_gateway.py)."""
    return {"e2a_purchase": purchase_id, "e2a_user": user_id, "credits": str(credits)}


def event(type: str, obj: dict, *, event_id: str | None = None,
          created: int | None = None) -> dict:
    """A snapshot event: `obj` as it was when the event happened."""
    return {
        "id": event_id or new_id("evt"),
        "object": "event",
        "api_version": API_VERSION,
        "created": int(time.time()) if created is None else created,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": type,
    }


def checkout_session(*, session_id: str, purchase_id: str, user_id: str, credits: int,
                     amount_total: int, currency: str = "usd", customer: str | None = None,
                     payment_intent: str | None = None, status: str = "complete",
                     payment_status: str = "paid", meta: dict | None = None,
                     client_reference_id: str | None = None) -> dict:
    """A Checkout Session object in mode=payment. `meta` replaces e2a's metadata (to test a
    session without it or with someone else's); client_reference_id defaults to the purchase."""
    now = int(time.time())
    return {
        "id": session_id,
        "object": "checkout.session",
        "amount_subtotal": amount_total,
        "amount_total": amount_total,
        "cancel_url": "https://e2a.example/v1/billing/checkout/done?canceled=1",
        "client_reference_id": purchase_id if client_reference_id is None
        else client_reference_id,
        "created": now - 60,
        "currency": currency,
        "customer": customer,
        "customer_details": {"email": f"{user_id}@example.com", "name": None},
        "expires_at": now + 86340,
        "livemode": False,
        "metadata": metadata(purchase_id, user_id, credits) if meta is None else meta,
        "mode": "payment",
        "payment_intent": payment_intent,
        "payment_method_types": ["card"],
        "payment_status": payment_status,
        "status": status,
        "success_url": "https://e2a.example/v1/billing/checkout/done",
        "url": None if status != "open" else f"https://checkout.stripe.com/c/pay/{session_id}",
    }


def checkout_session_completed(*, session_id: str, purchase_id: str, user_id: str,
                               credits: int, amount_total: int, currency: str = "usd",
                               customer: str | None = None, payment_intent: str | None = None,
                               payment_status: str = "paid", meta: dict | None = None,
                               client_reference_id: str | None = None,
                               event_id: str | None = None) -> dict:
    """The buyer finished Checkout; paid now (card) or later (payment_status "unpaid": a bank
    debit, settled by checkout.session.async_payment_succeeded/failed)."""
    return event("checkout.session.completed", checkout_session(
        session_id=session_id, purchase_id=purchase_id, user_id=user_id, credits=credits,
        amount_total=amount_total, currency=currency, customer=customer,
        payment_intent=payment_intent or new_id("pi"), payment_status=payment_status,
        meta=meta, client_reference_id=client_reference_id), event_id=event_id)


def checkout_session_async_payment_succeeded(*, session_id: str, purchase_id: str, user_id: str,
                                             credits: int, amount_total: int,
                                             currency: str = "usd", customer: str | None = None,
                                             payment_intent: str | None = None,
                                             meta: dict | None = None,
                                             event_id: str | None = None) -> dict:
    """A delayed payment of a completed session went through."""
    return event("checkout.session.async_payment_succeeded", checkout_session(
        session_id=session_id, purchase_id=purchase_id, user_id=user_id, credits=credits,
        amount_total=amount_total, currency=currency, customer=customer,
        payment_intent=payment_intent or new_id("pi"), payment_status="paid", meta=meta),
        event_id=event_id)


def checkout_session_expired(*, session_id: str, purchase_id: str, user_id: str, credits: int,
                             amount_total: int, currency: str = "usd",
                             customer: str | None = None, meta: dict | None = None,
                             event_id: str | None = None) -> dict:
    """The buyer never paid (a session expires after 24 h, or when e2a expires it)."""
    return event("checkout.session.expired", checkout_session(
        session_id=session_id, purchase_id=purchase_id, user_id=user_id, credits=credits,
        amount_total=amount_total, currency=currency, customer=customer, payment_intent=None,
        status="expired", payment_status="unpaid", meta=meta), event_id=event_id)


def payment_intent(*, payment_intent_id: str, purchase_id: str, user_id: str, credits: int,
                   amount: int, currency: str = "usd", customer: str | None = None,
                   payment_method: str | None = None, status: str = "succeeded",
                   meta: dict | None = None, last_payment_error: dict | None = None) -> dict:
    """A PaymentIntent object (an auto top-up's, or the one behind a Checkout Session)."""
    return {
        "id": payment_intent_id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_received": amount if status == "succeeded" else 0,
        "capture_method": "automatic_async",
        "client_secret": f"{payment_intent_id}_secret_{secrets.token_hex(8)}",
        "confirmation_method": "automatic",
        "created": int(time.time()) - 5,
        "currency": currency,
        "customer": customer,
        "description": None,
        "last_payment_error": last_payment_error,
        "latest_charge": new_id("ch") if status == "succeeded" else None,
        "livemode": False,
        "metadata": metadata(purchase_id, user_id, credits) if meta is None else meta,
        "payment_method": payment_method,
        "payment_method_types": ["card"],
        "setup_future_usage": None,
        "status": status,
    }


def payment_intent_succeeded(*, payment_intent_id: str, purchase_id: str, user_id: str,
                             credits: int, amount: int, currency: str = "usd",
                             customer: str | None = None, payment_method: str | None = None,
                             meta: dict | None = None, event_id: str | None = None) -> dict:
    return event("payment_intent.succeeded", payment_intent(
        payment_intent_id=payment_intent_id, purchase_id=purchase_id, user_id=user_id,
        credits=credits, amount=amount, currency=currency, customer=customer,
        payment_method=payment_method or new_id("pm"), meta=meta), event_id=event_id)


def payment_intent_payment_failed(*, payment_intent_id: str, purchase_id: str, user_id: str,
                                  credits: int, amount: int, currency: str = "usd",
                                  customer: str | None = None,
                                  payment_method: str | None = None,
                                  message: str = "Your card was declined.",
                                  code: str = "card_declined",
                                  decline_code: str | None = "generic_decline",
                                  meta: dict | None = None, event_id: str | None = None) -> dict:
    """A charge the card refused: the PaymentIntent is back to requires_payment_method, with
    the reason in last_payment_error (message: the words for the cardholder)."""
    pm = payment_method or new_id("pm")
    error = {"type": "card_error", "code": code, "decline_code": decline_code,
             "message": message, "doc_url": f"https://stripe.com/docs/error-codes/{code}",
             "payment_method": {"id": pm, "object": "payment_method", "type": "card"}}
    return event("payment_intent.payment_failed", payment_intent(
        payment_intent_id=payment_intent_id, purchase_id=purchase_id, user_id=user_id,
        credits=credits, amount=amount, currency=currency, customer=customer,
        payment_method=None, status="requires_payment_method", meta=meta,
        last_payment_error=error), event_id=event_id)
