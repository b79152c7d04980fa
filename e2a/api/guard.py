"""What every /v1 request passes before any route runs (an ASGI middleware):

* the API key: a request without a valid key is answered 401 before a byte of its body is read,
  so an anonymous client cannot make the server buffer anything (the few routes opened from a
  URL check their own access token instead: TOKEN_ROUTES). The login JWT (docs/accounts.md) is
  accepted on LOGIN_ROUTES only (keys and billing); everywhere else it is a 401 saying the route
  takes an API key. OPEN_ROUTES need no credentials (sign-in, and Stripe's webhook, which carries
  its own signature) and take a body of at most OPEN_MAX_BODY;
* a body limit on the JSON routes (E2A_MAX_BODY_BYTES): 413 `body_too_large`, from the
  Content-Length at once or, for a chunked body, as soon as the count passes it; the streamed
  routes (file and tar uploads, the port proxy) are not limited here;
* deadlines for the body to arrive (BODY_TIMEOUT between two chunks, BODY_DEADLINE for all
  of it): 408 `body_timeout`, so a client that stops or trickles mid-body does not hold a
  request open for ever.

The caller found here is left in the request's state for the routes (deps.current_user).
"""

from __future__ import annotations

import asyncio
import json
import re

from e2a.api.deps import caller_from_header, hop_caller, named_replica
from e2a.api.errors import ApiError, body
from e2a.api.hop_tokens import FORWARDED

BODY_TIMEOUT = 30.0     # the longest gap between two parts of a JSON body
BODY_DEADLINE = 120.0   # the longest a whole JSON body may take to arrive


class BodyRefused(BaseException):
    """Raised from `receive`. A BaseException, so that the framework's own `except Exception`
    around body parsing (which would turn it into a vague 400) lets it through to the guard."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# The routes whose body is streamed to the sandbox (no size limit, no buffering), matched on the
# whole path: a substring test let `POST /v1/sandboxes/ports/commands` (a sandbox "named" ports)
# past the limit.
PORT_PROXY = re.compile(r"^/v1/sandboxes/[^/]+/ports/[^/]+(/.*)?$")
FILE_UPLOAD = re.compile(r"^/v1/sandboxes/[^/]+/files(/tar)?$")


# Routes that carry an access token of their own (api/access.py) instead of the API key: a
# browser or a CDP client opens them from a URL. And noVNC's public files.
TOKEN_ROUTES = re.compile(r"^/v1/(browser|desktop|canvas)/[^/]+(/.*)?$|^/v1/novnc/")

# Routes anyone may call: signing in (rate-limited by the accounts service), Stripe's webhook
# (checked by its signature) and the page Stripe Checkout sends a buyer's browser back to.
OPEN_ROUTES = re.compile(r"^/v1/auth/(login|verify-otp)$|^/v1/billing/webhook$"
                         r"|^/v1/billing/checkout/done$")
OPEN_MAX_BODY = 1 << 20  # 1 MiB (a Stripe event is at most that; a sign-in needs a few bytes)
# Routes that take the login JWT as well as an API key (the deps then decide which of the two).
LOGIN_ROUTES = re.compile(r"^/v1/api-keys(/[^/]+)?$|^/v1/billing(/[A-Za-z0-9_-]+)*$|^/v1/usage$")


def streamed(method: str, path: str) -> bool:
    return bool(PORT_PROXY.match(path)) or (method == "PUT" and bool(FILE_UPLOAD.match(path)))


async def send_error(send, status: int, code: str, message: str, field: str | None = None) -> None:
    payload = json.dumps(body(code, message, field)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        anonymous = bool(OPEN_ROUTES.match(path))
        if not anonymous and not TOKEN_ROUTES.match(path):
            authorization = (headers.get(b"authorization") or b"").decode("latin-1")
            try:
                named = named_replica([v.decode("latin-1") for k, v in scope["headers"]
                                       if k == FORWARDED.encode()])
                hop = hop_caller(scope["app"], authorization, scope["method"], path, named) \
                    if named is not None else None
                if hop is not None:
                    caller, scope.setdefault("state", {})["hop"] = hop
                else:
                    caller = await caller_from_header(scope["app"], authorization,
                                                      allow_login=bool(LOGIN_ROUTES.match(path)))
            except ApiError as exc:
                return await send_error(send, exc.status, exc.code, exc.message, exc.field)
            scope.setdefault("state", {})["caller"] = caller
        if streamed(scope["method"], path):
            return await self.app(scope, receive, send)

        limit = min(self.max_body, OPEN_MAX_BODY) if anonymous else self.max_body
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await send_error(send, 400, "invalid_header", "Content-Length is not a number")
        if declared > limit:
            return await send_error(send, 413, "body_too_large",
                                    f"the request body is {declared} bytes; at most {limit} "
                                    "are accepted on this route")
        seen = 0
        complete = False
        started = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_DEADLINE

        async def guarded_receive():
            nonlocal seen, complete
            if complete:  # after the body: waits for a disconnect, however long
                return await receive()
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(BODY_TIMEOUT, left)))
            except asyncio.TimeoutError:
                raise BodyRefused(408, "body_timeout", "the request body did not arrive in time "
                                  f"(at most {BODY_TIMEOUT:.0f} s between two parts, "
                                  f"{BODY_DEADLINE:.0f} s in all)") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyRefused(413, "body_too_large",
                                      f"the request body is over {limit} bytes, the most "
                                      "accepted on this route")
                complete = not message.get("more_body", False)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except BodyRefused as exc:
            if not started:
                await send_error(send, exc.status, exc.code, exc.message)
