"""Accounts against the real server and a real SMTP server (tests/e2e/mailbox.py): sign in by
emailed code, the login JWT, API keys made, listed and revoked with it, the rate limits, the free
credits, and `e2a login` / `e2a logout` end to end (docs/accounts.md).

The per-client limit counts codes per source address over 15 minutes, and the shared server serves
every test of this worker: tests that spend a budget send from a loopback address of their own
(127.0.0.x), so 127.0.0.1's stays for the others."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.mailbox import client, new_key, sign_in

pytestmark = pytest.mark.e2e

E2A = str(Path(sys.executable).parent / "e2a")
KEY_FIELDS = {"key_id", "prefix", "revoked", "created_at", "plan_tier"}


def address(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com".lower()


def ledger_rows(server, user_id: str) -> list[tuple]:
    db = sqlite3.connect(f"file:{server.base / 'data' / 'e2a.db'}?mode=ro", uri=True)
    try:
        return db.execute("select kind, ref, amount_micro from ledger where user_id = ?",
                          (user_id,)).fetchall()
    finally:
        db.close()


def test_sign_in_by_mail_then_a_key_that_runs_sandboxes(server, mailbox):
    who = address("Sign.In")
    with client(server.url, "127.0.0.11") as c:
        since = mailbox.mark()
        r = c.post("/v1/auth/login", json={"email": f"  {who.upper()} "})
        assert r.status_code == 200, r.text
        sent = r.json()
        assert sent["email"] == who and sent["expires_in"] == 600
        assert set(sent) == {"email", "expires_in", "message"} and who in sent["message"]
        mail = mailbox.mail(who, since)
        assert mail.to == [who] and mail.message["To"] == who
        assert "e2a" in mail.message["From"] and mail.code in mail.message["Subject"]
        assert mail.code in mail.message.get_content() and "expires in 10 minutes" in \
            mail.message.get_content()

        r = c.post("/v1/auth/verify-otp", json={"email": who, "code": mail.code})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"token", "user_id", "email"}
        assert body["user_id"].startswith("usr_") and body["email"] == who
        token = body["token"]

    with client(server.url, token=token) as c:
        r = c.post("/v1/api-keys")
        assert r.status_code == 201, r.text
        made = r.json()
    assert set(made) == {"key_id", "key", "prefix"}
    assert made["key_id"].startswith("key_") and made["key"].startswith("e2a_live_")
    assert made["prefix"] == made["key"][:13]

    with client(server.url, token=made["key"]) as c:
        r = c.get("/v1/sandboxes")
        assert r.status_code == 200 and r.json() == []
    with client(server.url, token=token) as c:
        r = c.get("/v1/sandboxes")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert "takes an API key" in r.json()["error"]["message"]


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/sandboxes"), ("POST", "/v1/sandboxes"), ("GET", "/v1/templates"),
    ("GET", "/v1/workspaces"), ("GET", "/v1/tenants/me/secrets"), ("GET", "/v1/sessions"),
    ("POST", "/v1/sessions"), ("GET", "/v1/sandboxes/sbx_x/task"),
    ("POST", "/v1/sandboxes/sbx_x/commands"),
])
def test_the_login_token_is_refused_where_an_api_key_is_due(server, mailbox, method, path):
    me = _signed_in(server, mailbox)
    with client(server.url, token=me.token) as c:
        r = c.request(method, path, json={"template": "standard"})
    assert r.status_code == 401, r.text
    assert "takes an API key" in r.json()["error"]["message"]


_SIGNED_IN = {}


def _signed_in(server, mailbox):
    """One signed-in user shared by the parametrized cases (one login, not nine)."""
    if "me" not in _SIGNED_IN:
        _SIGNED_IN["me"] = sign_in(server.url, mailbox, address("shared"), "127.0.0.12")
    return _SIGNED_IN["me"]


def test_an_api_key_cannot_manage_keys_but_can_end_itself(server, mailbox):
    me = sign_in(server.url, mailbox, address("keyonly"), "127.0.0.13")
    first, second = new_key(server.url, me.token), new_key(server.url, me.token)
    with client(server.url, token=first["key"]) as c:
        for r in (c.post("/v1/api-keys"), c.get("/v1/api-keys"),
                  c.delete(f"/v1/api-keys/{second['key_id']}")):
            assert r.status_code == 401, r.text
            assert "login token" in r.json()["error"]["message"]
        assert c.get("/v1/sandboxes").status_code == 200
        r = c.delete(f"/v1/api-keys/{first['key_id']}")  # itself: allowed (e2a logout)
        assert r.status_code == 200 and r.json()["revoked"] is True
        assert c.get("/v1/sandboxes").status_code == 401
    with client(server.url, token=second["key"]) as c:
        assert c.get("/v1/sandboxes").status_code == 200


def test_the_list_never_shows_a_key(server, mailbox):
    me = sign_in(server.url, mailbox, address("list"), "127.0.0.14")
    made = [new_key(server.url, me.token) for _ in range(3)]
    with client(server.url, token=me.token) as c:
        r = c.delete(f"/v1/api-keys/{made[0]['key_id']}")
        assert r.status_code == 200
        r = c.get("/v1/api-keys")
    assert r.status_code == 200
    listed = r.json()["api_keys"]
    assert all(set(k) == KEY_FIELDS for k in listed)
    assert [k["key_id"] for k in listed] == [m["key_id"] for m in reversed(made)]  # newest first
    assert {k["key_id"]: k["revoked"] for k in listed} == {
        made[0]["key_id"]: True, made[1]["key_id"]: False, made[2]["key_id"]: False}
    assert all(k["plan_tier"] == "free" and k["prefix"].startswith("e2a_live_") for k in listed)
    for m in made:
        assert m["key"] not in r.text and m["key"][13:] not in r.text


def test_a_revoked_key_is_refused_at_once_and_one_revoked_elsewhere_within_a_second(server, mailbox):
    me = sign_in(server.url, mailbox, address("revoke"), "127.0.0.15")
    key = new_key(server.url, me.token)
    with client(server.url, token=key["key"]) as c:
        assert c.get("/v1/sandboxes").status_code == 200  # now in the server's key cache
        with client(server.url, token=me.token) as owner:
            r = owner.delete(f"/v1/api-keys/{key['key_id']}")
        assert r.status_code == 200
        assert set(r.json()) == KEY_FIELDS and r.json()["revoked"] is True
        r = c.get("/v1/sandboxes")  # the very next request
        assert r.status_code == 401 and r.json()["error"]["message"] == "invalid or revoked API key"
        with client(server.url, token=me.token) as owner:  # again: the same, harmless
            assert owner.delete(f"/v1/api-keys/{key['key_id']}").json()["revoked"] is True

    # Revoked by another process (the admin CLI on the database): the cache forgets it in 0.5 s.
    key = new_key(server.url, me.token)
    with client(server.url, token=key["key"]) as c:
        assert c.get("/v1/sandboxes").status_code == 200
        server.admin("revoke-key", key["key_id"])
        time.sleep(1.0)
        assert c.get("/v1/sandboxes").status_code == 401


def test_a_code_is_single_use_and_a_wrong_one_is_a_401(server, mailbox):
    who = address("once")
    with client(server.url, "127.0.0.16") as c:
        since = mailbox.mark()
        assert c.post("/v1/auth/login", json={"email": who}).status_code == 200
        code = mailbox.mail(who, since).code
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        r = c.post("/v1/auth/verify-otp", json={"email": who, "code": wrong})
        assert r.status_code == 401
        assert r.json()["error"] == {"code": "invalid_code", "message": "wrong or expired code",
                                     "field": None}
        assert c.post("/v1/auth/verify-otp", json={"email": who, "code": code}).status_code == 200
        r = c.post("/v1/auth/verify-otp", json={"email": who, "code": code})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_code"


def test_five_wrong_tries_kill_a_code(server, mailbox):
    who = address("tries")
    with client(server.url, "127.0.0.17") as c:
        since = mailbox.mark()
        assert c.post("/v1/auth/login", json={"email": who}).status_code == 200
        code = mailbox.mail(who, since).code
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        for _ in range(5):
            assert c.post("/v1/auth/verify-otp",
                          json={"email": who, "code": wrong}).status_code == 401
        r = c.post("/v1/auth/verify-otp", json={"email": who, "code": code})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_code"
        # a new code works
        since = mailbox.mark()
        assert c.post("/v1/auth/login", json={"email": who}).status_code == 200
        fresh = mailbox.mail(who, since).code
        assert c.post("/v1/auth/verify-otp", json={"email": who, "code": fresh}).status_code == 200


def test_five_codes_per_address_then_429_with_retry_after(server, mailbox):
    who = address("limit")
    for i in range(5):
        with client(server.url, f"127.0.0.{30 + i}") as c:  # from five addresses: the address counts
            assert c.post("/v1/auth/login", json={"email": who}).status_code == 200
    with client(server.url, "127.0.0.35") as c:
        r = c.post("/v1/auth/login", json={"email": who.upper()})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 0 < int(r.headers["retry-after"]) <= 900
    assert len(mailbox.sent_to(who)) == 5


def test_codes_per_client_address_then_429(server, mailbox):
    limit = int(server.env().get("E2A_LOGIN_PER_CLIENT", 30))
    with client(server.url, "127.0.0.3") as c:
        for i in range(limit):
            assert c.post("/v1/auth/login", json={"email": address(f"client{i}")}).status_code == 200
        r = c.post("/v1/auth/login", json={"email": address("one-more")})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 0 < int(r.headers["retry-after"]) <= 900
        assert "network address" in r.json()["error"]["message"]
    with client(server.url, "127.0.0.4") as c:  # another client is not held back
        assert c.post("/v1/auth/login", json={"email": address("other")}).status_code == 200


def test_a_new_account_gets_its_free_credits_once(server, mailbox):
    who = address("credits")
    first = sign_in(server.url, mailbox, who, "127.0.0.18")
    again = sign_in(server.url, mailbox, who.upper(), "127.0.0.18")
    assert first.user_id == again.user_id
    assert ledger_rows(server, first.user_id) == [("grant", f"signup:{first.user_id}", 100_000_000)]
    with client(server.url, token=again.token) as c:  # billing takes the login token too
        r = c.get("/v1/billing/balance")
    assert r.status_code == 200 and r.json()["credit_balance"] == 100


def test_users_never_see_each_others_keys(server, mailbox):
    ann = sign_in(server.url, mailbox, address("ann"), "127.0.0.19")
    ben = sign_in(server.url, mailbox, address("ben"), "127.0.0.19")
    ann_key = new_key(server.url, ann.token)
    with client(server.url, token=ben.token) as c:
        assert c.get("/v1/api-keys").json() == {"api_keys": []}
        r = c.delete(f"/v1/api-keys/{ann_key['key_id']}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "api_key_not_found"
    with client(server.url, token=ann_key["key"]) as c:
        assert c.get("/v1/sandboxes").status_code == 200
    with client(server.url, token=ann.token) as c:
        assert [k["key_id"] for k in c.get("/v1/api-keys").json()["api_keys"]] == [ann_key["key_id"]]


# ---------------------------------------------------------------- the CLI


def _cli(args, env, stdin=None, timeout=60):
    return subprocess.run([E2A, *args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_login_stores_a_key_and_logout_revokes_it(server, mailbox, tmp_path):
    who = address("cli")
    env = {k: v for k, v in os.environ.items() if k not in ("E2A_API_KEY", "E2A_URL")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    since = mailbox.mark()
    proc = subprocess.Popen([E2A, "--url", server.url, "login", "--email", who], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        code = mailbox.mail(who, since).code
        out, err = proc.communicate(code + "\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert who in out and "Logged in" in out

    folder = tmp_path / "config" / "e2a"
    creds = folder / "credentials"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    saved = json.loads(creds.read_text())
    assert saved["url"] == server.url and saved["api_key"].startswith("e2a_live_")
    assert saved["email"] == who and saved["key_id"].startswith("key_")
    assert saved["api_key"] not in out + err  # never printed

    r = _cli(["sandbox", "ls", "--json"], {**env, "E2A_URL": server.url})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    r = _cli(["sandbox", "ls"], {**env, "E2A_URL": server.url, "E2A_API_KEY": "e2a_live_nope"})
    assert r.returncode == 1 and "unauthorized" in r.stderr  # E2A_API_KEY wins

    r = _cli(["logout"], env)
    assert r.returncode == 0, r.stderr
    assert not creds.exists()
    with client(server.url, token=saved["api_key"]) as c:
        assert c.get("/v1/sandboxes").status_code == 401
    r = _cli(["sandbox", "ls"], {**env, "E2A_URL": server.url})
    assert r.returncode == 1 and "missing_api_key" in r.stderr


# ---------------------------------------------------------------- the SDK


def test_sdk_sign_in_and_keys(server, mailbox):
    import httpx

    from e2a.sdk import E2A, E2AError

    who = address("sdk")
    source = httpx.HTTPTransport(local_address="127.0.0.20")
    since = mailbox.mark()
    sent = E2A.login(who.upper(), server.url, transport=source)
    assert sent.email == who and sent.expires_in == 600
    code = mailbox.mail(who, since).code
    with pytest.raises(E2AError) as e:
        E2A.verify_otp(who, "000000" if code != "000000" else "111111", server.url,
                       transport=source)
    assert (e.value.status, e.value.code) == (401, "invalid_code")
    tok = E2A.verify_otp(who, code, server.url, transport=source)
    assert tok.email == who and tok.user_id.startswith("usr_") and tok.token not in repr(tok)
    with E2A(server.url, tok.token) as account:
        made = account.create_api_key()
        assert made.key.startswith("e2a_live_") and made.key not in repr(made)
        assert [k.key_id for k in account.api_keys()] == [made.key_id]
        with E2A(server.url, made.key) as c:
            assert c.list_sandboxes() == []
        assert account.revoke_api_key(made).revoked is True
        with E2A(server.url, made.key) as c, pytest.raises(E2AError) as e:
            c.list_sandboxes()
        assert e.value.status == 401


def test_async_sdk_sign_in_and_keys(server, mailbox):
    import asyncio

    import httpx

    from e2a.sdk import AsyncE2A

    who = address("async")

    async def go():
        source = httpx.AsyncHTTPTransport(local_address="127.0.0.20")
        since = mailbox.mark()
        await AsyncE2A.login(who, server.url, transport=source)
        code = await asyncio.to_thread(lambda: mailbox.mail(who, since).code)
        tok = await AsyncE2A.verify_otp(who, code, server.url, transport=source)
        async with AsyncE2A(server.url, tok.token) as account:
            made = await account.create_api_key()
            listed = await account.api_keys()
            revoked = await account.revoke_api_key(made.key_id)
        return made, listed, revoked

    made, listed, revoked = asyncio.run(go())
    assert [k.key_id for k in listed] == [made.key_id] and not listed[0].revoked
    assert revoked.key_id == made.key_id and revoked.revoked


def test_a_mail_server_that_is_down_is_a_503(server, mailbox):
    who = address("down")
    with client(server.url, "127.0.0.21") as c:
        mailbox.stop()
        try:
            r = c.post("/v1/auth/login", json={"email": who})
        finally:
            mailbox.start()
        assert r.status_code == 503 and r.json()["error"]["code"] == "mail_unavailable"
        assert "try again later" in r.json()["error"]["message"]
        since = mailbox.mark()
        assert c.post("/v1/auth/login", json={"email": who}).status_code == 200
        code = mailbox.mail(who, since).code
        assert c.post("/v1/auth/verify-otp", json={"email": who, "code": code}).status_code == 200
    assert "mail_unavailable" not in server.log_tail() and "could not send a login code" in \
        server.log_tail(100_000)
