"""A real SMTP server (aiosmtpd) that receives the test servers' login codes, and signing in
through it. One per test process, on port 2600 + the worker's index: every test server's
environment names it (smtp_env, in tests/e2e/server.py), with E2A_SMTP_SECURITY=none."""

from __future__ import annotations

import contextlib
import email
import email.policy
import itertools
import re
import threading
import time
from dataclasses import dataclass

import httpx

PORT_BASE = 2600


def smtp_port() -> int:
    from tests.conftest import worker_index  # not at import: conftest imports this module
    return PORT_BASE + worker_index()


def smtp_env() -> dict[str, str]:
    return {"E2A_SMTP_HOST": "127.0.0.1", "E2A_SMTP_PORT": str(smtp_port()),
            "E2A_SMTP_SECURITY": "none"}


@dataclass
class Mail:
    sender: str
    to: list[str]
    message: email.message.EmailMessage

    @property
    def code(self) -> str:
        return re.search(r"\b(\d{6})\b", self.message.get_content()).group(1)


class Mailbox:
    """Every message the SMTP server took, in order."""

    def __init__(self, port: int):
        self.port = port
        self.mails: list[Mail] = []
        self._cond = threading.Condition()
        self._controller = None

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd's handler hook
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._cond:
            self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), msg))
            self._cond.notify_all()
        return "250 OK"

    def start(self) -> None:
        """Listen (again: a test may stop it to see the mail server down)."""
        from aiosmtpd.controller import Controller

        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def mark(self) -> int:
        """Where the mailbox is now: `mail(to, since=mark)` waits for a newer message."""
        with self._cond:
            return len(self.mails)

    def mail(self, to: str, since: int = 0, timeout: float = 30) -> Mail:
        """The first message to `to` after `since`, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.mails[since:] if to in m.to]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no mail to {to} within {timeout} s")
                self._cond.wait(left)

    def sent_to(self, to: str, since: int = 0) -> list[Mail]:
        with self._cond:
            return [m for m in self.mails[since:] if to in m.to]


def client(url: str, source: str = "127.0.0.1", token: str | None = None) -> httpx.Client:
    """Raw HTTP to the server from a loopback address of the test's choice (the per-client rate
    limits count by it: a test that spends a budget uses an address of its own)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60,
                        transport=httpx.HTTPTransport(local_address=source))


@dataclass
class SignedIn:
    token: str     # the login JWT
    user_id: str
    email: str


_sources = itertools.count()


def fresh_source() -> str:
    """A loopback address no other sign-in of this process used lately (127.0.1.1-250): the
    per-client limit (E2A_LOGIN_PER_CLIENT per 15 minutes) never holds back a test that signs
    in, however many sign-ins came before it (schemathesis spends 127.0.0.1's)."""
    return f"127.0.1.{next(_sources) % 250 + 1}"


def sign_in(url: str, mailbox: Mailbox, address: str, source: str | None = None) -> SignedIn:
    """POST /v1/auth/login, the code from the mail, POST /v1/auth/verify-otp (from `source`, by
    default a fresh loopback address)."""
    with client(url, source or fresh_source()) as c:
        since = mailbox.mark()
        r = c.post("/v1/auth/login", json={"email": address})
        assert r.status_code == 200, r.text
        code = mailbox.mail(r.json()["email"], since).code
        r = c.post("/v1/auth/verify-otp", json={"email": address, "code": code})
        assert r.status_code == 200, r.text
        body = r.json()
        return SignedIn(body["token"], body["user_id"], body["email"])


def new_key(url: str, token: str) -> dict:
    """POST /v1/api-keys with the login JWT: {key_id, key, prefix}."""
    with client(url, token=token) as c:
        r = c.post("/v1/api-keys")
        assert r.status_code == 201, r.text
        return r.json()


@contextlib.contextmanager
def running(port: int):
    box = Mailbox(port)
    box.start()
    try:
        yield box
    finally:
        box.stop()
