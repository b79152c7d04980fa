"""Credits through the SDK (`client.billing`, sync and async) and the CLI (`e2a credits ...`)
against the real shared test server: it meters real gVisor sandboxes every second and talks to
stripe-mock (docs/billing.md, "SDK and CLI"). Each test has an account of its own, so its balance
is known: a new account has exactly 100 credits."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from e2a.billing.rates import MICRO, Rates, compute_cost
from e2a.config import Settings
from e2a.sdk import AsyncE2A, AutoTopup, E2A, E2AError, InsufficientCredits
from tests.conftest import wait_for
from tests.e2e.mailbox import client as http_client, sign_in

pytestmark = pytest.mark.e2e

E2A_BIN = str(Path(sys.executable).parent / "e2a")
STANDARD = Rates.from_settings(Settings()).rate_num(500, 512)  # micro-credits per second, scaled


class Account:
    """A fresh user of the shared server, with an SDK client and the CLI."""

    def __init__(self, server, tag: str):
        self.server = server
        self.email = f"{tag}-{uuid.uuid4().hex[:8]}@example.com"
        self.key = server.create_user(self.email)
        self.client = E2A(server.url, self.key)

    def cli(self, *args: str, key: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "E2A_URL": self.server.url, "E2A_API_KEY": key or self.key}
        return subprocess.run([E2A_BIN, *args], env=env, capture_output=True, text=True, timeout=120)

    def cli_signing_in(self, mailbox, *args: str, type_email: bool = False) -> subprocess.CompletedProcess:
        """The CLI for a command that signs in: its prompts answered on stdin, the Email (when
        `type_email`, else it is expected to be given or saved) and the code mailed to it."""
        with tempfile.TemporaryDirectory() as config:  # no credentials saved by e2a login
            env = {**os.environ, "E2A_URL": self.server.url, "E2A_API_KEY": self.key,
                   "XDG_CONFIG_HOME": config}
            since = mailbox.mark()
            proc = subprocess.Popen([E2A_BIN, *args], env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                if type_email:
                    proc.stdin.write(self.email + "\n")
                    proc.stdin.flush()
                try:
                    code = mailbox.mail(self.email, since).code
                except AssertionError:
                    proc.kill()
                    raise AssertionError(f"no code mailed; the CLI said: {proc.communicate()}") from None
                out, err = proc.communicate(code + "\n", timeout=120)
            finally:
                proc.kill()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def grant(self, credits: str, reason: str = "x") -> None:
        self.server.admin("grant", "--reason", reason, "--", self.email, credits)

    def charged(self, vm_id: str) -> int:
        return -sum(t.amount_micro for t in self.client.billing.iter_transactions()
                    if t.kind == "usage" and t.sandbox_id == vm_id)

    def close(self) -> None:
        for sb in self.client.list_sandboxes():
            if sb.state != "destroyed":
                self.client.kill(sb.vm_id)
        self.client.close()


@pytest.fixture
def account(server):
    a = Account(server, "credits")
    yield a
    a.close()


def ran_for_a_moment(a: Account) -> tuple[str, int]:
    """A standard sandbox charged at least once while running, then destroyed: its id and what
    its whole life cost, once its last charge is in (from its events, as metering reads them)."""
    sb = a.client.create_sandbox("standard", idle_timeout_seconds=600)
    wait_for(lambda: a.charged(sb.vm_id) > 0, timeout=15)
    a.client.kill(sb.vm_id)
    events = a.client.events(sb.vm_id)
    start = next(e.at for e in events if e.reason == "claimed" or
                 (e.to_state == "running" and e.from_state == "booting"))
    end = next(e.at for e in events if e.to_state == "destroyed")
    ms = int((datetime.fromisoformat(end) - datetime.fromisoformat(start)) / timedelta(milliseconds=1))
    cost = compute_cost(ms, STANDARD)
    wait_for(lambda: a.charged(sb.vm_id) == cost, timeout=15)
    return sb.vm_id, cost


# ---------------------------------------------------------------------------- the SDK


def test_sdk_balance_transactions_and_usage_after_a_sandbox_ran(account):
    b = account.client.billing.balance()
    assert (b.credit_balance, b.credit_balance_micro) == (100, 100 * MICRO)
    assert b.auto_topup == AutoTopup(enabled=False, threshold=0, credit_amount=0,
                                     payment_method_saved=False, last_failure=None)
    [grant] = account.client.billing.transactions()
    assert (grant.kind, grant.amount, grant.amount_micro) == ("grant", 100, 100 * MICRO)
    assert grant.id.startswith("txn_") and grant.sandbox_id is None

    vm, cost = ran_for_a_moment(account)
    assert cost > 0
    assert account.client.billing.balance().credit_balance_micro == 100 * MICRO - cost

    ledger = account.client.billing.transactions(limit=1000)
    assert ledger[-1].id == grant.id  # newest first: the grant is the oldest
    usage_rows = [t for t in ledger if t.kind == "usage"]
    assert len(usage_rows) == len(ledger) - 1
    assert all(t.sandbox_id == vm and t.amount_micro <= 0 and t.amount == t.amount_micro / MICRO
               for t in usage_rows)
    # every page, two at a time, is the same ledger
    assert [t.id for t in account.client.billing.iter_transactions(limit=2)] == [t.id for t in ledger]
    assert [t.id for t in account.client.billing.transactions(limit=1, offset=len(ledger) - 1)] == [grant.id]

    by_sandbox = account.client.billing.usage(group_by="sandbox")
    [item] = by_sandbox.items
    assert item.key == vm and item.credits == pytest.approx(cost / MICRO, abs=1e-6)
    assert item.vcpu_seconds > 0 and item.gib_seconds == pytest.approx(item.vcpu_seconds, abs=0.01)
    assert item.workspace_gib_hours == 0
    assert by_sandbox.total.credits == pytest.approx(item.credits, abs=1e-6)
    assert by_sandbox.rates == {"vcpu_second": 0.0014, "gib_second": 0.00045, "workspace_gib_hour": 0.01}
    [item] = account.client.billing.usage(group_by="template").items
    assert item.key == "standard" and item.credits == pytest.approx(cost / MICRO, abs=1e-6)
    days = {datetime.fromisoformat(t.timestamp).date().isoformat() for t in usage_rows}
    by_day = account.client.billing.usage()
    assert by_day.group_by == "day" and {i.key for i in by_day.items} == days
    assert by_day.total.credits == pytest.approx(cost / MICRO, abs=1e-6)
    # a window that ends before the sandbox ran holds nothing, and says which window it was
    old = account.client.billing.usage(start="2026-01-01", end=datetime(2026, 1, 2))
    assert old.items == [] and old.total.credits == 0
    assert (old.start, old.end) == ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z")
    with pytest.raises(E2AError) as e:
        account.client.billing.usage(start="2026-02-01", end="2026-01-01")
    assert (e.value.status, e.value.field) == (400, "from")


def test_async_sdk_reads_the_same(account):
    async def go():
        async with AsyncE2A(account.server.url, account.key) as c:
            b = await c.billing.balance()
            ledger = [t async for t in c.billing.iter_transactions(limit=1)]
            u = await c.billing.usage(group_by="sandbox")
            return b, ledger, u

    b, ledger, u = asyncio.run(go())
    assert b.credit_balance_micro == 100 * MICRO and b == account.client.billing.balance()
    assert [t.kind for t in ledger] == ["grant"] and ledger == account.client.billing.transactions()
    assert u.items == [] and u.group_by == "sandbox"


def test_a_balance_that_cannot_pay_is_insufficient_credits(account):
    account.grant("-100")
    assert account.client.billing.balance().credit_balance_micro == 0
    [adjustment, _] = account.client.billing.transactions()
    assert (adjustment.kind, adjustment.amount) == ("adjustment", -100)
    with pytest.raises(InsufficientCredits) as e:
        account.client.create_sandbox("standard")
    assert isinstance(e.value, E2AError)
    assert (e.value.status, e.value.code) == (402, "insufficient_credits")
    assert re.match(r"your balance is 0 credits; .* costs 0\.0555\b", e.value.message)

    async def create():
        async with AsyncE2A(account.server.url, account.key) as c:
            await c.create_sandbox("standard")

    with pytest.raises(InsufficientCredits):
        asyncio.run(create())
    assert account.client.list_sandboxes() == []
    # the CLI says the server's message, then what to do about it
    r = account.cli("sandbox", "create")
    assert r.returncode == 1 and r.stdout == ""
    first, hint = r.stderr.splitlines()
    assert first == f"error: insufficient_credits: {e.value.message}"
    assert hint == "hint: see your balance with `e2a credits`; buy credits with `e2a credits buy CREDITS`"
    assert account.cli("credits").stdout.splitlines()[0] == "Balance: 0 credits"


def test_checkout_returns_a_stripe_page(account):
    c = account.client.billing.checkout(500)
    assert c.url.startswith("https://") and c.purchase_id.startswith("pur_")
    assert account.client.billing.checkout(1200).purchase_id != c.purchase_id
    with pytest.raises(E2AError) as e:
        account.client.billing.checkout(499)
    assert (e.value.status, e.value.code, e.value.field) == (400, "invalid_field", "credit_amount")
    # nothing is granted before Stripe says it was paid
    assert account.client.billing.balance().credit_balance_micro == 100 * MICRO
    assert [t.kind for t in account.client.billing.transactions()] == ["grant"]


def test_auto_topup_needs_a_saved_card(account, mailbox):
    assert account.client.billing.auto_topup() == AutoTopup()  # read with the API key
    # saved with the login token only: they charge the card without its owner
    with pytest.raises(E2AError) as e:
        account.client.billing.set_auto_topup(False, 50, 600)
    assert (e.value.status, e.value.code) == (401, "unauthorized")
    signed = sign_in(account.server.url, mailbox, account.email)
    with E2A(account.server.url, signed.token) as c:
        billing = c.billing
        with pytest.raises(E2AError) as e:
            billing.set_auto_topup(True, 100, 500)
        assert (e.value.status, e.value.code) == (409, "no_payment_method")
        assert billing.auto_topup().enabled is False
        # turned off, the settings are kept without a card; what is left out stays as saved
        assert billing.set_auto_topup(False, 50, 600) == AutoTopup(enabled=False, threshold=50,
                                                                    credit_amount=600)
        assert billing.set_auto_topup(False, threshold=75) == AutoTopup(enabled=False, threshold=75,
                                                                         credit_amount=600)
    assert account.client.billing.auto_topup() == AutoTopup(enabled=False, threshold=75, credit_amount=600)
    assert account.client.billing.balance().auto_topup == account.client.billing.auto_topup()


def test_the_login_token_reads_credits_too(server, mailbox):
    who = f"jwt-credits-{uuid.uuid4().hex[:8]}@example.com"
    signed = sign_in(server.url, mailbox, who)
    with E2A(server.url, signed.token) as c:
        assert c.billing.balance().credit_balance == 100
        assert [t.kind for t in c.billing.transactions()] == ["grant"]
        assert c.billing.usage().items == []
    env = {**os.environ, "E2A_URL": server.url, "E2A_API_KEY": signed.token}
    r = subprocess.run([E2A_BIN, "credits"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("Balance: 100 credits\n")


# ---------------------------------------------------------------------------- the CLI


def test_cli_credits_end_to_end(account, mailbox):
    r = account.cli("credits")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Balance: 100 credits",
                                     "Auto top-up: off (no card saved: buying credits once saves one)"]
    assert json.loads(account.cli("credits", "--json").stdout)["credit_balance_micro"] == 100 * MICRO

    vm, cost = ran_for_a_moment(account)
    spent = account.client.billing.balance()
    r = account.cli("credits")
    assert r.stdout.splitlines()[0] == f"Balance: {Decimal(spent.credit_balance_micro) / MICRO} credits"

    r = account.cli("credits", "transactions", "--limit", "1000")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "KIND", "AMOUNT", "DESCRIPTION"]
    ledger = account.client.billing.transactions(limit=1000)
    rows = [ln.split() for ln in lines[1:] if re.match(r" ?\d{4}-\d\d-\d\d ", ln)]  # descriptions fold
    assert [(row[2], row[3]) for row in rows] == [(t.kind, str(Decimal(t.amount_micro) / MICRO))
                                                  for t in ledger]
    assert rows[-1][2:] == ["grant", "100", "100", "free", "credits", "for", "a", "new", "account"]
    last = account.cli("credits", "transactions", "--limit", "1").stdout
    assert last.splitlines()[1].split()[2:4] == [ledger[0].kind, str(Decimal(ledger[0].amount_micro) / MICRO)]

    r = account.cli("credits", "usage", "--by", "sandbox")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("From ") and lines[0].endswith(" UTC")
    assert lines[1].split() == ["SANDBOX", "CREDITS", "VCPU-S", "GIB-S", "GIB-H"]
    row, total = lines[2].split(), lines[3].split()
    item = account.client.billing.usage(group_by="sandbox").items[0]
    assert row[:2] == [vm, str(Decimal(cost) / MICRO)]
    assert float(row[2]) == pytest.approx(item.vcpu_seconds, abs=0.001) and row[4] == "0"
    assert total[0] == "TOTAL" and total[1:] == row[1:]
    r = account.cli("credits", "usage", "--by", "template", "--from", "2026-01-01")
    assert r.stdout.splitlines()[2].split()[0] == "standard"
    r = account.cli("credits", "usage", "--to", "2026-01-01")
    assert r.returncode == 0 and r.stdout.splitlines()[1] == "Nothing spent in this window."
    r = account.cli("credits", "usage", "--from", "soon")
    assert r.returncode == 1 and r.stderr.startswith("error: invalid_field: from must be an ISO 8601")

    r = account.cli("credits", "buy", "500")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("https://") and r.stdout.count("\n") == 1
    assert "500 credits (purchase pur_" in r.stderr
    r = account.cli("credits", "buy", "10")
    assert r.returncode == 1 and r.stderr.startswith("error: invalid_field: credit_amount must be from 500")

    # a change signs in (the code mailed to the address) and saves with the login token
    r = account.cli_signing_in(mailbox, "credits", "auto-topup", "--enable", "--threshold", "100",
                               "--amount", "500", "--email", account.email)
    assert r.returncode == 1 and r.stdout == ""
    # (after the prompt "Code: ": a pipe does not echo the code's newline as a terminal would)
    assert "error: no_payment_method: auto top-up charges the card" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("hint: buy credits once with `e2a credits buy CREDITS`")
    assert "Code:" in r.stderr and "Email:" not in r.stderr  # --email: only the code is asked
    r = account.cli_signing_in(mailbox, "credits", "auto-topup", "--threshold", "70", "--amount", "800",
                               type_email=True)
    assert r.returncode == 0, r.stderr
    assert "Email:" in r.stderr and f"A login code was sent to {account.email}" in r.stderr
    assert r.stdout == "Auto top-up: off (no card saved: buying credits once saves one)\n"
    shown = json.loads(account.cli("credits", "auto-topup", "--json").stdout)  # a read: no sign-in
    assert (shown["enabled"], shown["threshold"], shown["credit_amount"]) == (False, 70, 800)
    assert account.client.billing.auto_topup().threshold == 70
    # the same PUT with the API key is refused, and changes nothing
    with http_client(account.server.url, token=account.key) as c:
        r = c.put("/v1/billing/auto-topup", json={"enabled": False, "threshold": 5, "credit_amount": 800})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert account.client.billing.auto_topup().threshold == 70
