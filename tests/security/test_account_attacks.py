"""Attacks on sign-in and API keys (docs/accounts.md), against the shared test server and its
SMTP server: guessing codes, forged and misused tokens, address tricks, spoofed client addresses,
secrets leaking into answers, and reaching another user's keys.

Each test that spends a per-client budget sends from a loopback address of its own (127.0.0.x:
the server listens on 127.0.0.1 and sees each source as another client)."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone

import jwt
import pytest

from e2a.accounts.tokens import AUDIENCE, LoginTokens
from e2a.sandboxes.agent_keys import AgentKeys
from e2a.sessions.tokens import SessionTokens
from tests.e2e.mailbox import client, new_key, sign_in

pytestmark = pytest.mark.e2e


def address(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


def host_keys(server) -> AgentKeys:
    """The server's own host key (root can read it): tokens signed with it are what the server
    itself would issue."""
    return AgentKeys(server.base / "data" / "agent.key")


def refused_on_key_routes(server, token: str) -> None:
    with client(server.url, token=token) as c:
        for r in (c.get("/v1/api-keys"), c.post("/v1/api-keys")):
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "unauthorized"


def test_guessing_codes_is_stopped(server, mailbox):
    victim = address("victim")
    since = mailbox.mark()
    with client(server.url, "127.0.0.40") as c:
        assert c.post("/v1/auth/login", json={"email": victim}).status_code == 200
    code = mailbox.mail(victim, since).code
    guesses = [f"{(int(code) + i) % 1_000_000:06d}" for i in range(1, 11)]
    answers = []
    for i, guess in enumerate(guesses):  # from ten addresses: the victim's address counts
        with client(server.url, f"127.0.0.{41 + i}") as c:
            answers.append(c.post("/v1/auth/verify-otp", json={"email": victim, "code": guess}))
    assert [r.status_code for r in answers] == [401] * 10
    assert {r.json()["error"]["code"] for r in answers} == {"invalid_code"}
    with client(server.url, "127.0.0.51") as c:
        # the 11th try, with the right code: held back (and the code is dead after 5 anyway)
        r = c.post("/v1/auth/verify-otp", json={"email": victim, "code": code})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 0 < int(r.headers["retry-after"]) <= 900
        assert "token" not in r.text


def test_one_client_guessing_across_addresses_is_stopped(server, mailbox):
    with client(server.url, "127.0.0.52") as c:
        for i in range(50):
            r = c.post("/v1/auth/verify-otp", json={"email": address(f"spray{i}"),
                                                    "code": "000000"})
            assert r.status_code == 401
        r = c.post("/v1/auth/verify-otp", json={"email": address("spray"), "code": "000000"})
        assert r.status_code == 429 and "network address" in r.json()["error"]["message"]


def test_a_session_jwt_is_not_a_login_token(server, mailbox):
    me = sign_in(server.url, mailbox, address("sess"), "127.0.0.53")
    session_jwt = SessionTokens(host_keys(server)).issue(
        "ses_x", me.user_id, datetime.now(timezone.utc) + timedelta(hours=1))
    refused_on_key_routes(server, session_jwt)
    # the session's key with the login token's claims: still refused (the keys differ)
    now = int(time.time())
    claims = {"iss": "e2a", "aud": AUDIENCE, "sub": me.user_id, "email": me.email, "iat": now,
              "exp": now + 600, "jti": "x"}
    forged = jwt.encode(claims, host_keys(server).token("e2a session jwt").encode(), "HS256")
    refused_on_key_routes(server, forged)


def test_forged_login_tokens_are_refused(server, mailbox, tmp_path):
    me = sign_in(server.url, mailbox, address("forge"), "127.0.0.54")
    now = int(time.time())
    claims = {"iss": "e2a", "aud": AUDIENCE, "sub": me.user_id, "email": me.email, "iat": now,
              "exp": now + 600, "jti": "x"}
    other_host = LoginTokens(AgentKeys(tmp_path / "other.key"), 600)
    header, payload, _ = me.token.split(".")
    for token in (
        other_host.issue(me.user_id, me.email)[0],                 # another server's key
        jwt.encode(claims, None, algorithm="none"),                 # unsigned
        jwt.encode(claims, "secret" * 6, algorithm="HS256"),        # a guessable key
        jwt.encode(claims, (server.base / "data" / "agent.key").read_bytes(),
                   algorithm="HS256"),                              # the host key, underived
        jwt.encode(claims, host_keys(server).token("e2a account jwt").encode(),
                   algorithm="HS512"),                              # the real key, another alg
        jwt.encode({**claims, "aud": "e2a-session"},               # the real key, wrong audience
                   host_keys(server).token("e2a account jwt").encode(), "HS256"),
        f"{header}.{payload}.",                                     # the real token, unsigned
        me.token[:-4] + ("AAAA" if not me.token.endswith("AAAA") else "BBBB"),  # tampered
    ):
        refused_on_key_routes(server, token)
    with client(server.url, token=me.token) as c:  # the real one works
        assert c.get("/v1/api-keys").status_code == 200


def test_an_expired_login_token_is_refused(server, mailbox):
    me = sign_in(server.url, mailbox, address("old"), "127.0.0.55")
    expired = LoginTokens(host_keys(server), 60, clock=lambda: time.time() - 3600)
    token, _ = expired.issue(me.user_id, me.email)
    with client(server.url, token=token) as c:
        r = c.get("/v1/api-keys")
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_a_login_token_never_opens_sandboxes(server, mailbox, sandbox):
    me = sign_in(server.url, mailbox, address("nosbx"), "127.0.0.56")
    with client(server.url, token=me.token) as c:
        for method, path in (("GET", f"/v1/sandboxes/{sandbox.vm_id}"),
                             ("POST", f"/v1/sandboxes/{sandbox.vm_id}/commands"),
                             ("DELETE", f"/v1/sandboxes/{sandbox.vm_id}"),
                             ("GET", f"/v1/sandboxes/{sandbox.vm_id}/files"),
                             # a path that would match the billing pattern once undotted
                             ("GET", "/v1/billing/../sandboxes")):
            r = c.request(method, path, json={"cmd": "id"})
            assert r.status_code == 401, (path, r.text)
    assert sandbox.run("true").exit_code == 0  # still alive


def test_address_tricks_make_no_second_account_nor_more_codes(server, mailbox):
    base = address("trick")
    variants = [base, base.upper(), f"  {base}", f"{base}\t", base.capitalize()]
    ids = set()
    for i, variant in enumerate(variants):
        ids.add(sign_in(server.url, mailbox, variant, f"127.0.0.{60 + i}").user_id)
    assert len(ids) == 1
    with client(server.url, "127.0.0.66") as c:  # five codes spent: the sixth is refused
        r = c.post("/v1/auth/login", json={"email": f" {base.swapcase()} "})
        assert r.status_code == 429
        for bad in (base.replace("@", "\u200b@"), "\u212a" + base[1:], base + "\r\nBcc: x@x.test",
                    base.replace("example", "exa\u0301mple")):
            r = c.post("/v1/auth/login", json={"email": bad})
            assert r.status_code == 400 and r.json()["error"]["field"] == "email", bad


def test_a_spoofed_forwarded_for_does_not_reset_the_client_limit(server, mailbox):
    limit = int(server.env().get("E2A_LOGIN_PER_CLIENT", 30))
    with client(server.url, "127.0.0.70") as c:
        for i in range(limit):
            r = c.post("/v1/auth/login", json={"email": address(f"xff{i}")},
                       headers={"X-Forwarded-For": f"203.0.113.{i + 1}"})
            assert r.status_code == 200
        r = c.post("/v1/auth/login", json={"email": address("xff")},
                   headers={"X-Forwarded-For": "198.51.100.7", "X-Real-IP": "198.51.100.7",
                            "Forwarded": "for=198.51.100.7"})
        assert r.status_code == 429


def test_no_code_or_token_in_other_answers(server, mailbox):
    who = address("leak")
    with client(server.url, "127.0.0.71") as c:
        since = mailbox.mark()
        r = c.post("/v1/auth/login", json={"email": who})
        code = mailbox.mail(who, since).code
        assert code not in r.text and code not in str(r.headers)
        # the same answer, word for word but the address, for an account that now exists
        since = mailbox.mark()
        again = c.post("/v1/auth/login", json={"email": who})
        assert again.json() == r.json()
        code = mailbox.mail(who, since).code
        wrong = c.post("/v1/auth/verify-otp", json={"email": who, "code": "12345x"})
        assert "12345x" not in wrong.text and code not in wrong.text
        ok = c.post("/v1/auth/verify-otp", json={"email": who, "code": code})
        token = ok.json()["token"]
        assert code not in ok.text
    made = new_key(server.url, token)
    with client(server.url, token=token) as c:
        listed = c.get("/v1/api-keys")
        revoked = c.delete(f"/v1/api-keys/{made['key_id']}")
    for r in (listed, revoked):
        assert token not in r.text and made["key"] not in r.text and code not in r.text
    assert token not in server.log_tail(1_000_000) and made["key"] not in server.log_tail(1_000_000)


def test_another_users_keys_cannot_be_listed_or_revoked(server, mailbox):
    owner = sign_in(server.url, mailbox, address("owner"), "127.0.0.72")
    thief = sign_in(server.url, mailbox, address("thief"), "127.0.0.72")
    key = new_key(server.url, owner.token)
    thief_key = new_key(server.url, thief.token)
    with client(server.url, token=thief.token) as c:
        assert [k["key_id"] for k in c.get("/v1/api-keys").json()["api_keys"]] == \
            [thief_key["key_id"]]
        r = c.delete(f"/v1/api-keys/{key['key_id']}")
        assert r.status_code == 404
        r = c.delete("/v1/api-keys/key_doesnotexist00000000")
        assert r.status_code == 404  # the same answer as for the owner's key
    with client(server.url, token=thief_key["key"]) as c:  # the thief's API key: itself only
        r = c.delete(f"/v1/api-keys/{key['key_id']}")
        assert r.status_code == 401
    with client(server.url, token=key["key"]) as c:
        assert c.get("/v1/sandboxes").status_code == 200


def test_sign_in_routes_take_no_big_body(server):
    with client(server.url, "127.0.0.73") as c:
        r = c.post("/v1/auth/login", content=b'{"email": "' + b"a" * (2 << 20) + b'"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
