"""The accounts service (e2a/accounts/service.py) on a store of its own with a fake clock and a
mailer that keeps what it would send: code expiry, single use, superseding, the tries of a code,
the rate limits and their Retry-After, the HMAC at rest, and the login JWT against the session
JWT. The same behaviour through the real server and SMTP is tests/e2e/test_accounts.py."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timedelta, timezone

import jwt
import pytest
from sqlalchemy import select

from e2a import auth
from e2a.accounts import service as svc_mod
from e2a.accounts.mail import MailError
from e2a.accounts.service import AccountError, Accounts, client_key, normalise_email
from e2a.accounts.tokens import AUDIENCE, InvalidToken, LoginTokens
from e2a.config import Settings
from e2a.sandboxes.agent_keys import AgentKeys
from e2a.sessions.tokens import InvalidToken as InvalidSessionToken
from e2a.sessions.tokens import SessionTokens
from e2a.store import db as store
from e2a.store.models import LedgerEntry, LoginCode, User
from tests.unit import stores

pytestmark = pytest.mark.anyio

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Outbox:
    """A mailer that keeps the codes (or fails, when told to)."""

    to_log = False

    def __init__(self):
        self.sent: list[tuple[str, str]] = []
        self.fail: MailError | None = None

    async def send_code(self, to: str, code: str, ttl: int) -> None:
        if self.fail:
            raise self.fail
        self.sent.append((to, code))

    def last(self, to: str) -> str:
        return next(code for addr, code in reversed(self.sent) if addr == to)


@pytest.fixture(params=["sqlite", "postgresql"])
async def world(request, tmp_path):
    if request.param == "sqlite":
        engine = store.make_engine(stores.sqlite_url(tmp_path))
    else:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        engine = await stores.pg_engine(f"accounts_{worker}")
        if engine is None:
            pytest.skip("E2A_TEST_PG_URL not set (make test starts PostgreSQL and sets it)")
    await store.migrate(engine)
    sessions = store.sessionmaker(engine)
    keys = AgentKeys(tmp_path / "agent.key")
    clock, outbox = Clock(), Outbox()
    settings = Settings(data_dir=tmp_path, login_per_client=8, login_code_ttl=600,
                        login_token_ttl=3600, free_credits=100)
    cache = auth.KeyCache()
    accounts = Accounts(sessions, keys, settings, outbox, key_cache=cache, clock=clock)
    yield accounts, clock, outbox, sessions, keys
    await engine.dispose()


async def codes_of(sessions, email):
    async with sessions() as db:
        return list((await db.execute(select(LoginCode).where(LoginCode.email == email)
                                      .order_by(LoginCode.id))).scalars())


async def status_of(coro) -> tuple[int, str, int | None]:
    try:
        await coro
    except AccountError as exc:
        return exc.status, exc.code, exc.retry_after
    return 200, "ok", None


# ---------------------------------------------------------------- addresses


def test_addresses_are_trimmed_and_lowered():
    assert normalise_email("  Alice@Example.COM\t") == "alice@example.com"
    assert normalise_email("admin@localhost") == "admin@localhost"
    assert normalise_email("a.b+tag@sub.example.org") == "a.b+tag@sub.example.org"


@pytest.mark.parametrize("bad", [
    "", "   ", "alice", "alice@", "@example.com", "a@b@example.com", "al ice@example.com",
    "alice@exa mple.com", "alice@-example.com", "alice@example..com", ".alice@example.com",
    "alice.@example.com", "alice@1.2.3.4", "\u212aate@example.com", "ali\u0441e@example.com",
    "alice@example.com\r\nBcc: x@evil.test", "a" * 65 + "@example.com",
    "a@" + ".".join(["b" * 60] * 5) + ".com",
])
def test_bad_addresses_are_a_400_naming_email(bad):
    with pytest.raises(AccountError) as e:
        normalise_email(bad)
    assert (e.value.status, e.value.code, e.value.field) == (400, "invalid_field", "email")
    assert e.value.message.startswith("email: ")


def test_clients_are_counted_by_ipv4_or_ipv6_64():
    assert client_key("127.0.0.3") == "127.0.0.3"
    assert client_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9") \
        == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key(None) == "unknown"


# ---------------------------------------------------------------- login and verify


async def test_one_account_and_one_free_grant_however_many_logins(world):
    accounts, clock, outbox, sessions, _ = world
    first = await accounts.login("Bob@Example.com", "10.0.0.1")
    await accounts.login(" bob@example.com ", "10.0.0.2")
    assert first.email == "bob@example.com" and first.expires_in == 600 and not first.to_log
    done = await accounts.verify("BOB@example.com", outbox.last("bob@example.com"), "10.0.0.2")
    async with sessions() as db:
        users = (await db.execute(select(User).where(User.email == "bob@example.com"))).scalars().all()
        grants = (await db.execute(select(LedgerEntry).where(
            LedgerEntry.user_id == users[0].id))).scalars().all()
    assert len(users) == 1 and done.user_id == users[0].id and done.email == "bob@example.com"
    assert [(g.kind, g.ref, g.amount_micro) for g in grants] == [
        ("grant", f"signup:{users[0].id}", 100_000_000)]


async def test_a_user_made_by_hand_in_mixed_case_is_found(world):
    accounts, clock, outbox, sessions, _ = world
    async with sessions() as db:
        made = await auth.create_user(db, "Carol@Example.com", 100)
        await db.commit()
    await accounts.login("carol@example.com", "10.0.0.1")
    done = await accounts.verify("carol@example.com", outbox.last("carol@example.com"), "10.0.0.1")
    assert done.user_id == made.id


async def test_only_an_hmac_of_the_code_is_stored(world):
    accounts, clock, outbox, sessions, _ = world
    await accounts.login("dan@example.com", "10.0.0.1")
    code = outbox.last("dan@example.com")
    (row,) = await codes_of(sessions, "dan@example.com")
    assert len(code) == 6 and code.isdigit()
    assert code not in row.code_hash and len(row.code_hash) == 64
    assert row.code_hash == accounts._hash("dan@example.com", code)
    assert row.code_hash != accounts._hash("eve@example.com", code)  # bound to the address
    assert row.client == "10.0.0.1"


async def test_a_code_expires_after_its_ttl(world):
    accounts, clock, outbox, sessions, _ = world
    await accounts.login("erin@example.com", "10.0.0.1")
    code = outbox.last("erin@example.com")
    clock.advance(600)
    assert await status_of(accounts.verify("erin@example.com", code, "10.0.0.1")) == \
        (401, "invalid_code", None)
    await accounts.login("erin@example.com", "10.0.0.1")
    clock.advance(599)
    done = await accounts.verify("erin@example.com", outbox.last("erin@example.com"), "10.0.0.1")
    assert done.user_id.startswith("usr_")


async def test_a_code_works_once(world):
    accounts, clock, outbox, sessions, _ = world
    await accounts.login("fay@example.com", "10.0.0.1")
    code = outbox.last("fay@example.com")
    await accounts.verify("fay@example.com", code, "10.0.0.1")
    with pytest.raises(AccountError) as e:
        await accounts.verify("fay@example.com", code, "10.0.0.1")
    assert (e.value.status, e.value.code, e.value.message) == (401, "invalid_code",
                                                               "wrong or expired code")


async def test_a_newer_code_supersedes_the_older(world):
    accounts, clock, outbox, sessions, _ = world
    await accounts.login("gus@example.com", "10.0.0.1")
    old = outbox.last("gus@example.com")
    await accounts.login("gus@example.com", "10.0.0.1")
    new = outbox.last("gus@example.com")
    if old != new:  # one time in a million they are the same code
        assert (await status_of(accounts.verify("gus@example.com", old, "10.0.0.1")))[0] == 401
    assert (await status_of(accounts.verify("gus@example.com", new, "10.0.0.1")))[0] == 200


async def test_five_wrong_tries_kill_the_code_and_four_do_not(world):
    accounts, clock, outbox, sessions, _ = world
    await accounts.login("hal@example.com", "10.0.0.1")
    code = outbox.last("hal@example.com")
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(4):
        assert (await status_of(accounts.verify("hal@example.com", wrong, "10.0.0.1")))[0] == 401
    assert (await status_of(accounts.verify("hal@example.com", code, "10.0.0.1")))[0] == 200

    await accounts.login("hal@example.com", "10.0.0.1")
    code = outbox.last("hal@example.com")
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(5):
        assert (await status_of(accounts.verify("hal@example.com", wrong, "10.0.0.1")))[0] == 401
    assert await status_of(accounts.verify("hal@example.com", code, "10.0.0.1")) == \
        (401, "invalid_code", None)
    assert (await codes_of(sessions, "hal@example.com"))[-1].attempts == 5


async def test_parallel_guesses_never_pass_five_tries_and_a_code_is_spent_once(world):
    accounts, clock, outbox, sessions, _ = world
    await accounts.login("ida@example.com", "10.0.0.1")
    code = outbox.last("ida@example.com")
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    await asyncio.gather(*(status_of(accounts.verify("ida@example.com", wrong, f"10.1.0.{i}"))
                           for i in range(9)))
    assert (await codes_of(sessions, "ida@example.com"))[-1].attempts == 5
    clock.advance(svc_mod.WINDOW)  # the address's failures are forgotten
    await accounts.login("ida@example.com", "10.0.0.1")
    code = outbox.last("ida@example.com")
    results = await asyncio.gather(*(status_of(accounts.verify("ida@example.com", code, "10.0.0.1"))
                                     for _ in range(5)))
    assert sorted(r[0] for r in results) == [200, 401, 401, 401, 401]


async def test_codes_of_other_forms_are_wrong_codes(world):
    accounts, clock, outbox, sessions, _ = world
    await accounts.login("jan@example.com", "10.0.0.1")
    code = outbox.last("jan@example.com")
    for given in ("", "12345", "1234567", "abcdef", code + "0", "０" * 6):
        assert (await status_of(accounts.verify("jan@example.com", given, "10.0.0.1")))[0] == 401
    clock.advance(svc_mod.WINDOW)
    await accounts.login("jan@example.com", "10.0.0.1")
    code = outbox.last("jan@example.com")
    assert (await status_of(accounts.verify("jan@example.com", f" {code[:3]} {code[3:]} ",
                                            "10.0.0.1")))[0] == 200


async def test_verify_without_any_code_is_the_same_401(world):
    accounts, clock, outbox, sessions, _ = world
    assert await status_of(accounts.verify("nobody@example.com", "123456", "10.0.0.1")) == \
        (401, "invalid_code", None)


# ---------------------------------------------------------------- rate limits


async def test_five_codes_per_address_per_window_with_retry_after(world):
    accounts, clock, outbox, sessions, _ = world
    for i in range(5):
        await accounts.login("kim@example.com", f"10.0.0.{i}")
        clock.advance(60)
    status, code, retry = await status_of(accounts.login("KIM@example.com ", "10.9.9.9"))
    assert (status, code) == (429, "rate_limited")
    assert retry == 900 - 5 * 60  # when the first of the five leaves the window
    assert len(outbox.sent) == 5 and len(await codes_of(sessions, "kim@example.com")) == 5
    clock.advance(retry - 1)
    assert (await status_of(accounts.login("kim@example.com", "10.9.9.9")))[:2] == \
        (429, "rate_limited")
    clock.advance(1)
    assert (await status_of(accounts.login("kim@example.com", "10.9.9.9")))[0] == 200


async def test_codes_per_client_per_window(world):
    accounts, clock, outbox, sessions, _ = world
    for i in range(8):  # login_per_client=8 in this world
        await accounts.login(f"user{i}@example.com", "10.0.0.7")
    status, code, retry = await status_of(accounts.login("other@example.com", "10.0.0.7"))
    assert (status, code, retry) == (429, "rate_limited", 900)
    # the limit is the client's: the same address from elsewhere is fine
    assert (await status_of(accounts.login("other@example.com", "10.0.0.8")))[0] == 200
    # an IPv6 client is one /64
    for i in range(8):
        await accounts.login(f"six{i}@example.com", f"2001:db8::{i + 1}")
    assert (await status_of(accounts.login("six9@example.com", "2001:db8::ffff")))[0] == 429


async def test_a_rate_limited_login_makes_no_account(world):
    accounts, clock, outbox, sessions, _ = world
    for i in range(8):
        await accounts.login(f"u{i}@example.com", "10.0.0.5")
    await status_of(accounts.login("late@example.com", "10.0.0.5"))
    async with sessions() as db:
        assert await db.scalar(select(User.id).where(User.email == "late@example.com")) is None


async def test_failed_verifies_per_address_and_per_client(world):
    accounts, clock, outbox, sessions, _ = world
    for i in range(svc_mod.VERIFY_FAILS_PER_ADDRESS):
        assert (await status_of(accounts.verify("lou@example.com", "000000", f"10.2.0.{i}")))[0] \
            == 401
    await accounts.login("lou@example.com", "10.0.0.1")
    right = outbox.last("lou@example.com")
    status, code, retry = await status_of(accounts.verify("lou@example.com", right, "10.3.0.1"))
    assert (status, code, retry) == (429, "rate_limited", 900)  # even the right code waits
    clock.advance(900)
    assert (await status_of(accounts.verify("lou@example.com", right, "10.3.0.1")))[0] == 401
    # expired by now (600 s): the limiter let it through to the check

    for i in range(svc_mod.VERIFY_FAILS_PER_CLIENT):
        await status_of(accounts.verify(f"m{i}@example.com", "000000", "10.4.0.1"))
    assert (await status_of(accounts.verify("new@example.com", "000000", "10.4.0.1")))[:2] == \
        (429, "rate_limited")
    assert (await status_of(accounts.verify("new@example.com", "000000", "10.4.0.2")))[0] == 401


async def test_a_mail_failure_is_a_503_and_its_code_is_dead(world):
    accounts, clock, outbox, sessions, _ = world
    outbox.fail = MailError("the login code could not be sent: e2a's mail server is not answering")
    assert await status_of(accounts.login("max@example.com", "10.0.0.1")) == \
        (503, "mail_unavailable", None)
    (row,) = await codes_of(sessions, "max@example.com")
    assert row.used_at is not None
    outbox.fail = MailError("refused", refused=True)
    with pytest.raises(AccountError) as e:
        await accounts.login("max@example.com", "10.0.0.1")
    assert (e.value.status, e.value.field) == (400, "email")


# ---------------------------------------------------------------- tokens


async def test_login_and_session_tokens_never_stand_for_each_other(world, tmp_path):
    accounts, clock, outbox, sessions, keys = world
    real = LoginTokens(keys, 3600)
    login_token, _ = real.issue("usr_abc", "a@example.com")
    assert real.verify(login_token).user_id == "usr_abc"
    session_tokens = SessionTokens(keys)
    session_token = session_tokens.issue("ses_1", "usr_abc",
                                         datetime.now(timezone.utc) + timedelta(hours=1))
    with pytest.raises(InvalidToken):
        real.verify(session_token)
    with pytest.raises(InvalidSessionToken):
        session_tokens.verify(login_token, "ses_1")
    # the right audience and claims, signed with the session's key: still refused
    session_key = keys.token("e2a session jwt").encode()
    now = int(time.time())
    forged = jwt.encode({"iss": "e2a", "aud": AUDIENCE, "sub": "usr_abc", "email": "a@example.com",
                         "iat": now, "exp": now + 60, "jti": "x"}, session_key, algorithm="HS256")
    with pytest.raises(InvalidToken):
        real.verify(forged)
    # another host's key
    other = LoginTokens(AgentKeys(tmp_path / "other.key"), 3600)
    with pytest.raises(InvalidToken):
        real.verify(other.issue("usr_abc", "a@example.com")[0])
    # alg none
    unsigned = jwt.encode({"iss": "e2a", "aud": AUDIENCE, "sub": "usr_abc", "email": "a@x.com",
                           "iat": now, "exp": now + 60, "jti": "x"}, None, algorithm="none")
    with pytest.raises(InvalidToken):
        real.verify(unsigned)


async def test_a_login_token_expires(world):
    accounts, clock, outbox, sessions, keys = world
    now = [time.time()]
    tokens = LoginTokens(keys, 60, clock=lambda: now[0])
    token, expires_at = tokens.issue("usr_abc", "a@example.com")
    assert tokens.verify(token).expires_at == expires_at
    now[0] += 66  # past the expiry and the 5 s of leeway
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(token)
    past = LoginTokens(keys, 60, clock=lambda: time.time() - 120)  # PyJWT's own clock check
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(past.issue("usr_abc", "a@example.com")[0])


async def test_verify_hands_out_a_login_token_of_the_user(world):
    accounts, clock, outbox, sessions, keys = world
    accounts.clock = lambda: datetime.now(timezone.utc)
    await accounts.login("ned@example.com", "10.0.0.1")
    done = await accounts.verify("ned@example.com", outbox.last("ned@example.com"), "10.0.0.1")
    claims = accounts.tokens.verify(done.token)
    assert (claims.user_id, claims.email) == (done.user_id, "ned@example.com")
    decoded = jwt.decode(done.token, options={"verify_signature": False})
    assert decoded["aud"] == "e2a-account" and decoded["iss"] == "e2a"
    assert decoded["exp"] - decoded["iat"] == 3600 and decoded["jti"]


# ---------------------------------------------------------------- keys


async def test_keys_are_the_users_own_and_revocation_evicts_them(world):
    accounts, clock, outbox, sessions, _ = world
    async with sessions() as db:
        a = (await auth.create_user(db, "a@example.com", 0)).id
        b = (await auth.create_user(db, "b@example.com", 0)).id
        await db.commit()
    row, secret = await accounts.create_key(a)
    assert secret.startswith("e2a_live_") and row.prefix == secret[:13]
    caller = auth.Caller(id=a, key_id=row.id)
    accounts.key_cache.put(secret, caller)
    assert [k.id for k in await accounts.keys(a)] == [row.id] and await accounts.keys(b) == []
    with pytest.raises(AccountError) as e:
        await accounts.revoke_key(b, row.id)
    assert (e.value.status, e.value.code) == (404, "api_key_not_found")
    assert accounts.key_cache.get(secret) == caller
    revoked = await accounts.revoke_key(a, row.id)
    assert revoked.revoked and accounts.key_cache.get(secret) is None
    accounts.key_cache.put(secret, caller)  # a lookup that read it just before the revocation
    assert accounts.key_cache.get(secret) is None
    async with sessions() as db:
        assert await auth.caller_for_key(db, secret) is None


async def test_active_keys_are_capped(world, monkeypatch):
    accounts, clock, outbox, sessions, _ = world
    monkeypatch.setattr(svc_mod, "MAX_ACTIVE_KEYS", 3)
    async with sessions() as db:
        a = (await auth.create_user(db, "a@example.com", 0)).id
        await db.commit()
    rows = [(await accounts.create_key(a))[0] for _ in range(3)]
    with pytest.raises(AccountError) as e:
        await accounts.create_key(a)
    assert (e.value.status, e.value.code) == (409, "too_many_api_keys")
    await accounts.revoke_key(a, rows[0].id)
    await accounts.create_key(a)


def test_key_cache_ttl_is_under_a_second():
    assert auth.KeyCache().ttl <= 1.0
