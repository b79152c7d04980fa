"""Everything e2a asks of Stripe, in one small async wrapper over the official `stripe` library.

Credits are bought through Stripe Checkout (the card is saved for off-session use) and topped up
automatically by an off-session PaymentIntent on that saved card. Stripe's answer that counts is
the webhook (`parse_webhook`); what the calls here return is only a first look.

Failures come out as two exceptions and one result:
- `StripeUnavailable`: Stripe could not be asked (connection, timeout, 5xx, 429) or refused e2a
  itself (a wrong or revoked secret key, a request Stripe rejects). Nothing the buyer did.
- `WebhookRejected`: a webhook body that is not a signed, fresh Stripe event.
- `Charge(status="failed", message=...)`: the buyer's card was declined or needs them present.
Messages never hold the secret key: every one is built here and scrubbed of key-looking
strings, and raised with no chained exception, so that no traceback carries the library's own
(stripe-mock echoes the whole Authorization header in its 401).

How stripe-mock v0.203.0 (the tests' Stripe, scripts/build-stripe-mock.sh) answers, found by
calling it; it validates every request against Stripe's OpenAPI spec (400 on an unknown or
mistyped parameter) and answers from fixtures:
- Every create returns a fresh id (cus_…, cs_test_…, pi_…); the idempotency key is only echoed
  in a header: a repeated key creates another object with another id.
- Top-level scalars of a create are echoed (amount, currency, customer, payment_method,
  client_reference_id, success_url, mode); nested objects are not: `metadata` comes back {} and
  a Checkout Session's amount_total and currency are null.
- A Checkout Session has a `url`, but the same fixture URL for every session, and its
  `payment_intent` is the same fixture id (pi_1PgafyB7WZ01zgkWSjxsAJo3) for every session.
- A PaymentIntent created with confirm=true, off_session=true has status
  "requires_payment_method" (the fixture's), so `charge` answers "failed" there; a retrieved one
  has that status too, the id from the path and amount 1099. Its `payment_method` is null unless
  expanded (then a fixture pm_1Pgc75B7WZ01zgkWlHVgdEGJ): hence the expand in payment_method_of.
So with stripe-mock no grant can be keyed by what Stripe echoes (metadata, amounts, the
PaymentIntent of a session): e2a keys grants by its own purchase id and amounts from its own
Purchase row, and tests deliver the events themselves (tests/stripe_mock.py builds them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Literal

import stripe

log = logging.getLogger(__name__)

# What the buyer reads when an off-session charge needs them (3-D Secure, a new card).
NEEDS_CARDHOLDER = "the card needs the cardholder: buy credits through checkout"
# A saved card or customer that Stripe no longer knows (removed in the dashboard, detached).
CARD_UNUSABLE = "the saved card can no longer be charged: buy credits through checkout"

# Anything that looks like a Stripe key (secret, restricted, webhook secret), however it got
# into a message.
_KEYISH = re.compile(r"\b(?:sk|rk|whsec)_[A-Za-z0-9_]+")


class _ScrubKeys(logging.Filter):
    """The library logs Stripe's error messages (INFO) and request bodies (DEBUG) to the "stripe"
    logger. Stripe masks keys in its messages; stripe-mock does not, and neither need anything
    else that answers at the api base: key-looking strings are cut from those records too.
    (STRIPE_LOG=info|debug also prints them to stderr unfiltered: not for production.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _scrub(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_scrub(a) if isinstance(a, str) else a for a in record.args)
        return True


logging.getLogger("stripe").addFilter(_ScrubKeys())


class StripeUnavailable(Exception):
    """Stripe could not be asked, or refused e2a's own request. `message` is safe to show."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class WebhookRejected(Exception):
    """A webhook body that is not a correctly signed, fresh Stripe event (answer 400)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Charge:
    """The first answer to an off-session charge; the payment_intent.* webhook is the final one
    for "pending" (and repeats "succeeded"/"failed")."""

    status: Literal["succeeded", "pending", "failed"]
    payment_intent_id: str | None
    message: str | None = None  # short, for the buyer, when failed


class StripeGateway:
    def __init__(self, secret_key: str, webhook_secret: str = "", *, api_base: str = "",
                 timeout: float = 30.0, max_network_retries: int = 2):
        self._secret_key = secret_key
        self._webhook_secret = webhook_secret
        # httpx underneath, the async methods only (`*_async`): the server's event loop is never
        # blocked on Stripe. The client is bound to the loop it is first used in.
        self._http = stripe.HTTPXClient(timeout=timeout)
        # The library retries connection errors, 409 and 5xx itself (with backoff, and with the
        # idempotency keys below a retry never creates a second object).
        self._client = stripe.StripeClient(
            secret_key, http_client=self._http, max_network_retries=max_network_retries,
            base_addresses={"api": api_base.rstrip("/")} if api_base else None)

    @classmethod
    def from_settings(cls, settings) -> StripeGateway | None:
        """The gateway the settings describe, or None without a secret key (no purchases)."""
        if not settings.stripe_secret_key:
            return None
        return cls(settings.stripe_secret_key, settings.stripe_webhook_secret,
                   api_base=settings.stripe_api_base)

    async def aclose(self) -> None:
        await self._http.close_async()

    # ---- calls ----------------------------------------------------------------------------

    async def customer(self, user_id: str, email: str, existing_id: str | None = None) -> str:
        """The user's Stripe Customer id: `existing_id` as is, else a new Customer."""
        if existing_id:
            return existing_id
        # Two racing first purchases make one Customer (Stripe keeps a key for 24 h); the email
        # is in the key because Stripe refuses a key reused with other parameters.
        key = f"e2a-customer-{user_id}-{hashlib.sha256(email.encode()).hexdigest()[:16]}"
        c = await self._call(self._client.v1.customers.create_async(
            {"email": email, "metadata": {"e2a_user": user_id}}, {"idempotency_key": key}))
        return c.id

    async def checkout(self, *, customer: str | None, purchase_id: str, user_id: str,
                       credits: int, amount_cents: int, currency: str, success_url: str,
                       cancel_url: str) -> tuple[str, str]:
        """A Checkout Session paying `amount_cents` for `credits`: (session id, its URL).
        The card is saved on the customer for auto top-up (setup_future_usage=off_session)."""
        metadata = _metadata(purchase_id, user_id, credits)
        params: dict = {
            "mode": "payment",
            "line_items": [{"quantity": 1, "price_data": {
                "currency": currency.lower(), "unit_amount": amount_cents,
                "product_data": {"name": f"{credits} e2a credits"}}}],
            # the metadata twice: the session's for checkout.session.*, the PaymentIntent's for
            # payment_intent.* events
            "payment_intent_data": {"setup_future_usage": "off_session", "metadata": metadata},
            "metadata": metadata,
            "client_reference_id": purchase_id,
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
        if customer:
            params["customer"] = customer
        # the purchase id as idempotency key: a retried request returns the same session
        s = await self._call(self._client.v1.checkout.sessions.create_async(
            params, {"idempotency_key": purchase_id}))
        if not s.url:
            raise StripeUnavailable("Stripe returned a checkout session without a URL")
        return s.id, s.url

    async def payment_method_of(self, payment_intent_id: str) -> str | None:
        """The card a PaymentIntent was paid with (to charge it again off-session), if any."""
        # Expanded: Stripe answers the same id either way; stripe-mock only when expanded.
        pi = await self._call(self._client.v1.payment_intents.retrieve_async(
            payment_intent_id, {"expand": ["payment_method"]}))
        pm = pi.payment_method
        if pm is None:
            return None
        return pm if isinstance(pm, str) else pm.id

    async def charge(self, *, customer: str, payment_method: str, amount_cents: int,
                     currency: str, purchase_id: str, user_id: str, credits: int) -> Charge:
        """Charge the saved card without the buyer (auto top-up)."""
        params = {
            "amount": amount_cents,
            "currency": currency.lower(),
            "customer": customer,
            "payment_method": payment_method,
            "confirm": True,
            "off_session": True,
            # nobody is there to follow a redirect; without this Stripe wants a return_url
            "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
            "description": f"{credits} e2a credits (auto top-up)",
            "metadata": _metadata(purchase_id, user_id, credits),
        }
        try:
            pi = await self._call(self._client.v1.payment_intents.create_async(
                params, {"idempotency_key": purchase_id}), declines=True)
        except _Declined as d:
            return Charge("failed", d.payment_intent_id, d.message)
        if pi.status == "succeeded":
            return Charge("succeeded", pi.id)
        if pi.status in ("processing", "requires_capture"):
            return Charge("pending", pi.id)
        # requires_action (3-D Secure), requires_payment_method (declined), canceled
        message = getattr(getattr(pi, "last_payment_error", None), "message", None)
        return Charge("failed", pi.id, _short(message) if isinstance(message, str) and message
                      else NEEDS_CARDHOLDER)

    # ---- webhooks -------------------------------------------------------------------------

    def parse_webhook(self, payload: bytes | str, signature_header: str | None) -> dict:
        """The event a webhook delivers, once its Stripe-Signature is right and at most 300 s
        old (Stripe's default tolerance), as plain JSON dicts: event["type"],
        event["data"]["object"].get("metadata"). Not the library's stripe.Event: in stripe 16
        its objects are no mappings (no .get, no iteration; a missing field raises), and the
        handler only reads fields; it never calls Stripe through the event."""
        if not self._webhook_secret:
            raise WebhookRejected("no webhook secret is configured")
        if not signature_header:
            raise WebhookRejected("missing Stripe-Signature header")
        try:
            text = payload.decode("utf-8") if isinstance(payload, (bytes, bytearray)) else payload
        except UnicodeDecodeError:
            raise WebhookRejected("the body is not UTF-8") from None
        try:
            stripe.WebhookSignature.verify_header(text, signature_header, self._webhook_secret,
                                                  stripe.Webhook.DEFAULT_TOLERANCE)
        except stripe.SignatureVerificationError as e:
            # Stripe's messages name the header's problem, never the secret
            raise WebhookRejected(f"bad signature: {_scrub(e.user_message or '')}") from None
        try:
            data = json.loads(text)
        except ValueError:
            raise WebhookRejected("the body is not JSON") from None
        if not (isinstance(data, dict) and data.get("object") == "event"
                and isinstance(data.get("id"), str) and isinstance(data.get("type"), str)
                and isinstance(data.get("data"), dict)):
            raise WebhookRejected("the body is not a Stripe event")
        return data

    # ---- errors ---------------------------------------------------------------------------

    async def _call(self, request, *, declines: bool = False):
        """Await one request of the library. A Stripe exception becomes `StripeUnavailable`, or
        with `declines` (a charge) a card's refusal becomes `_Declined`. Raised outside the
        `except`, so the library's exception (whose text may hold the key) is not even the
        new one's __context__."""
        try:
            return await request
        except stripe.StripeError as e:
            failure = self._failure(e, declines)
        if isinstance(failure, StripeUnavailable):
            log.warning("stripe: %s", failure.message)
        raise failure

    def _failure(self, e: stripe.StripeError, declines: bool) -> Exception:
        if declines and isinstance(e, stripe.CardError):
            # 402: declined (also authentication_required for an off-session charge). Its
            # message is written for the cardholder ("Your card was declined.").
            pi_id = getattr(getattr(e.error, "payment_intent", None), "id", None)
            return _Declined(pi_id, _short(self._scrub(e.user_message or "the card was declined")))
        if (declines and isinstance(e, stripe.InvalidRequestError)
                and e.code == "resource_missing" and e.param in ("payment_method", "customer")):
            return _Declined(None, CARD_UNUSABLE)
        status = e.http_status
        if isinstance(e, stripe.APIConnectionError):
            text = "could not reach Stripe"
        elif isinstance(e, stripe.AuthenticationError):
            text = "Stripe refused the secret key (401)"
        elif isinstance(e, stripe.PermissionError):
            text = "the secret key may not do this (403)"
        elif isinstance(e, stripe.RateLimitError):
            text = "Stripe is rate-limiting e2a (429)"
        elif isinstance(e, stripe.APIError):
            text = f"Stripe failed ({status})"
        else:  # a request Stripe refuses: e2a's bug, or an idempotency key reused
            text = f"Stripe refused the request ({status}): {e.user_message or ''}"
        return StripeUnavailable(_short(self._scrub(text)))

    def _scrub(self, text: str) -> str:
        for secret in (self._secret_key, self._webhook_secret):
            if secret:
                text = text.replace(secret, "[key]")
        return _scrub(text)


class _Declined(Exception):
    """A charge the card refused; `charge` answers it as a failed Charge."""

    def __init__(self, payment_intent_id: str | None, message: str):
        self.payment_intent_id = payment_intent_id
        self.message = message


def _metadata(purchase_id: str, user_id: str, credits: int) -> dict[str, str]:
    return {"e2a_purchase": purchase_id, "e2a_user": user_id, "credits": str(credits)}


def _scrub(text: str) -> str:
    return _KEYISH.sub("[key]", text)


def _short(text: str) -> str:
    # Purchase.error and Account.topup_error hold 300 characters
    return text if len(text) <= 300 else text[:297] + "..."
