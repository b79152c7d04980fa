"""Sign-in by an emailed one-time code, and the API keys a signed-in user manages
(docs/accounts.md).

* `login(email, client)`: the account is made on first use (with the free credits, once); a
  6-digit code (from `secrets`) is mailed, and only its HMAC-SHA256 under a key derived from the
  host key is stored, bound to the address. A newer code supersedes the older ones. The answer is
  the same whether the account existed or not.
* `verify(email, code, client)`: the latest code of the address, compared in constant time,
  spent by one success; a wrong, expired, used or superseded code is 401 `invalid_code`, and a
  code dies after MAX_TRIES tries.
* Rate limits (429 with Retry-After): codes asked per address (5) and per client address
  (E2A_LOGIN_PER_CLIENT) in WINDOW, counted in login_codes so they hold across restarts and
  replicas; failed verifies per address and per client in WINDOW, counted in this process.
  Together with MAX_TRIES a guesser gets at most 5 codes x 5 tries per address per 15 minutes,
  a 1 in 40,000 chance, whatever the process count or the restarts.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import ipaddress
import math
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from e2a import auth
from e2a.accounts.mail import Mailer, MailError
from e2a.accounts.tokens import LoginTokens
from e2a.config import Settings
from e2a.refusal import Refusal
from e2a.sandboxes.agent_keys import AgentKeys
from e2a.sandboxes.records import aware, utcnow
from e2a.store.models import ApiKey, LoginCode, User

WINDOW = 15 * 60                 # seconds every rate limit counts over
CODES_PER_ADDRESS = 5            # login codes one email address may be sent per WINDOW
MAX_TRIES = 5                    # tries of one code (the 5th may still be right), then it is dead
VERIFY_FAILS_PER_ADDRESS = 10    # failed verifies of one address per WINDOW
VERIFY_FAILS_PER_CLIENT = 50     # failed verifies from one client address per WINDOW
MAX_ACTIVE_KEYS = 100            # unrevoked API keys one user may hold
MAX_EMAIL = 254                  # the longest address SMTP can carry (RFC 5321 path, less <>)
CODE_DIGITS = 6
CODE_PURPOSE = "e2a login code"  # the derivation label of the codes' HMAC key

INVALID_CODE = "wrong or expired code"

_LOCAL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class AccountError(Refusal):
    """A sign-in or key request refused (400, 401, 429, 503, …)."""


def normalise_email(raw: str) -> str:
    """The address as accounts are keyed: trimmed and in lower case (so `Alice@X.com ` and
    `alice@x.com` are one account and share one rate limit). Plain ASCII addresses only, at most
    254 characters, one @, a dot-atom local part and a host name of letters, digits and hyphens:
    anything else is a 400 naming `email`."""
    def invalid(why: str) -> AccountError:
        return AccountError(400, "invalid_field", f"email: {why}", "email")

    if not isinstance(raw, str):
        raise invalid("must be a string")
    email = raw.strip()
    if not email:
        raise invalid("is empty")
    if len(email) > MAX_EMAIL:
        raise invalid(f"is longer than {MAX_EMAIL} characters")
    if not email.isascii():
        raise invalid("must be a plain ASCII address (no accented or other non-ASCII letters)")
    email = email.lower()
    local, at, domain = email.rpartition("@")
    if not at or not local or "@" in local:
        raise invalid("is not an email address (exactly one @ is expected)")
    if len(local) > 64 or not _LOCAL.match(local):
        raise invalid("is not an email address (the part before @ holds a character or a dot "
                      "that addresses may not)")
    labels = domain.split(".")
    if not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        raise invalid("is not an email address (the part after @ must be a host name such as "
                      "example.com)")
    return email


def client_key(host: str | None) -> str:
    """What the per-client limits count by: the IPv4 address, or an IPv6 address's /64 (one
    host's whole range)."""
    try:
        ip = ipaddress.ip_address((host or "").strip())
    except ValueError:
        return (host or "unknown")[:64]
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


class Window:
    """Events per key in the last `seconds`, in this process (for the verify limits)."""

    def __init__(self, limit: int, seconds: float):
        self.limit, self.seconds = limit, seconds
        self._hits: dict[str, collections.deque[float]] = {}

    def _live(self, key: str, now: float) -> collections.deque[float] | None:
        hits = self._hits.get(key)
        if hits is None:
            return None
        while hits and hits[0] <= now - self.seconds:
            hits.popleft()
        if not hits:
            del self._hits[key]
            return None
        return hits

    def retry_after(self, key: str, now: float) -> int | None:
        """Seconds until one more is allowed, or None if it is now."""
        hits = self._live(key, now)
        if hits is None or len(hits) < self.limit:
            return None
        return max(1, math.ceil(hits[len(hits) - self.limit] + self.seconds - now))

    def hit(self, key: str, now: float) -> None:
        if len(self._hits) > 100_000:  # many keys: drop those whose events are all old
            for k in list(self._hits):
                self._live(k, now)
        self._hits.setdefault(key, collections.deque()).append(now)


@dataclass(frozen=True)
class CodeSent:
    email: str        # as normalised: the address to verify with
    expires_in: int   # seconds
    to_log: bool      # no SMTP server is set: the code is in the server's log


@dataclass(frozen=True)
class Verified:
    token: str
    user_id: str
    email: str
    expires_at: datetime


class Accounts:
    def __init__(self, sessions: async_sessionmaker, keys: AgentKeys, settings: Settings,
                 mailer: Mailer, key_cache: auth.KeyCache | None = None,
                 clock: Callable[[], datetime] = utcnow):
        self.sessions = sessions
        self.settings = settings
        self.mailer = mailer
        self.key_cache = key_cache
        self.clock = clock
        self.tokens = LoginTokens(keys, settings.login_token_ttl,
                                  clock=lambda: self.clock().timestamp())
        self._code_key = keys.token(CODE_PURPOSE).encode()
        self._verify_fails = {"address": Window(VERIFY_FAILS_PER_ADDRESS, WINDOW),
                              "client": Window(VERIFY_FAILS_PER_CLIENT, WINDOW)}
        # Checking a limit and adding the code is one step in this process (two requests at
        # once cannot both take the last code of a window).
        self._issue = asyncio.Lock()

    def _hash(self, email: str, code: str) -> str:
        return hmac.new(self._code_key, f"{email}\0{code}".encode(), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------ login

    async def login(self, raw_email: str, client: str | None) -> CodeSent:
        email = normalise_email(raw_email)
        client = client_key(client)
        ttl = self.settings.login_code_ttl
        code = f"{secrets.randbelow(10 ** CODE_DIGITS):0{CODE_DIGITS}d}"
        async with self._issue:
            now = self.clock()
            async with self.sessions() as db:
                since = now - timedelta(seconds=WINDOW)
                await self._limit(db, LoginCode.email == email, since, now, CODES_PER_ADDRESS,
                                  f"too many login codes were asked for this address: at most "
                                  f"{CODES_PER_ADDRESS} per {WINDOW // 60} minutes")
                await self._limit(db, LoginCode.client == client, since, now,
                                  self.settings.login_per_client,
                                  f"too many login codes were asked from your network address: at "
                                  f"most {self.settings.login_per_client} per {WINDOW // 60} "
                                  "minutes")
            await self._user_id(email, create=True)
            async with self.sessions() as db:
                await db.execute(update(LoginCode).where(LoginCode.email == email,
                                                         LoginCode.used_at.is_(None))
                                 .values(used_at=now))  # superseded
                row = LoginCode(email=email, code_hash=self._hash(email, code), client=client,
                                created_at=now, expires_at=now + timedelta(seconds=ttl),
                                attempts=0)
                db.add(row)
                await db.commit()
                code_id = row.id
        try:
            await self.mailer.send_code(email, code, ttl)
        except MailError as exc:
            async with self.sessions() as db:  # never delivered: nobody may use it
                await db.execute(update(LoginCode).where(LoginCode.id == code_id)
                                 .values(used_at=self.clock()))
                await db.commit()
            if exc.refused:
                raise AccountError(400, "invalid_field", f"email: {exc}", "email") from None
            raise AccountError(503, "mail_unavailable", str(exc)) from None
        return CodeSent(email=email, expires_in=ttl, to_log=self.mailer.to_log)

    async def _limit(self, db, which, since: datetime, now: datetime, limit: int,
                     message: str) -> None:
        times = (await db.execute(select(LoginCode.created_at).where(
            which, LoginCode.created_at > since).order_by(LoginCode.created_at))).scalars().all()
        if len(times) < limit:
            return
        frees = aware(times[len(times) - limit]) + timedelta(seconds=WINDOW)
        wait = max(1, math.ceil((frees - now).total_seconds()))
        raise AccountError(429, "rate_limited", f"{message}; try again in {wait} s",
                           retry_after=wait)

    async def _user_id(self, email: str, create: bool = False) -> str | None:
        """The user of this address (made, with the free credits, if `create`). Addresses are
        stored normalised; one written by hand in mixed case (`e2a admin create-user`) is
        found too."""
        for attempt in range(2):
            async with self.sessions() as db:
                uid = await db.scalar(select(User.id).where(User.email == email))
                if uid is None:
                    uid = await db.scalar(select(User.id).where(func.lower(User.email) == email)
                                          .order_by(User.created_at).limit(1))
                if uid is not None or not create:
                    return uid
                try:
                    user = await auth.create_user(db, email, self.settings.free_credits)
                    await db.commit()
                    return user.id
                except IntegrityError:  # made at the same moment by another replica
                    await db.rollback()
        raise RuntimeError(f"cannot find or make the user of {email}")

    # ------------------------------------------------------------ verify

    async def verify(self, raw_email: str, code: str, client: str | None) -> Verified:
        email = normalise_email(raw_email)
        client = client_key(client)
        now = self.clock()
        for kind, key in (("address", email), ("client", client)):
            wait = self._verify_fails[kind].retry_after(key, now.timestamp())
            if wait is not None:
                who = "this address" if kind == "address" else "your network address"
                limit = self._verify_fails[kind].limit
                raise AccountError(429, "rate_limited",
                                   f"too many wrong codes for {who}: at most {limit} per "
                                   f"{WINDOW // 60} minutes; try again in {wait} s",
                                   retry_after=wait)
        given = "".join(str(code).split())
        digest = self._hash(email, given)  # computed whatever happens next: same work each try
        ok = False
        async with self.sessions() as db:
            row = await db.scalar(select(LoginCode).where(
                LoginCode.email == email, LoginCode.used_at.is_(None))
                .order_by(LoginCode.id.desc()).limit(1))
            if row is not None:
                # One try claimed atomically: parallel guesses cannot pass MAX_TRIES.
                claimed = await db.execute(update(LoginCode).where(
                    LoginCode.id == row.id, LoginCode.used_at.is_(None),
                    LoginCode.attempts < MAX_TRIES, LoginCode.expires_at > now)
                    .values(attempts=LoginCode.attempts + 1)
                    .execution_options(synchronize_session=False))
                if claimed.rowcount == 1 and hmac.compare_digest(digest, row.code_hash) \
                        and len(given) == CODE_DIGITS and given.isdigit():
                    spent = await db.execute(update(LoginCode).where(
                        LoginCode.id == row.id, LoginCode.used_at.is_(None)).values(used_at=now)
                        .execution_options(synchronize_session=False))
                    ok = spent.rowcount == 1  # single use, also against a parallel success
            await db.commit()
        if not ok:
            for kind, key in (("address", email), ("client", client)):
                self._verify_fails[kind].hit(key, now.timestamp())
            raise AccountError(401, "invalid_code", INVALID_CODE)
        user_id = await self._user_id(email, create=True)
        token, expires_at = self.tokens.issue(user_id, email)
        return Verified(token=token, user_id=user_id, email=email, expires_at=expires_at)

    # ------------------------------------------------------------ API keys

    async def create_key(self, user_id: str) -> tuple[ApiKey, str]:
        async with self.sessions() as db:
            active = await db.scalar(select(func.count()).select_from(ApiKey).where(
                ApiKey.user_id == user_id, ApiKey.revoked.is_(False)))
            if active >= MAX_ACTIVE_KEYS:
                raise AccountError(409, "too_many_api_keys",
                                   f"you hold {active} API keys, the most one account may: "
                                   "revoke one you no longer use (DELETE /v1/api-keys/{id})")
            row, secret = await auth.create_key(db, user_id)
            await db.commit()
        return row, secret

    async def keys(self, user_id: str) -> list[ApiKey]:
        async with self.sessions() as db:
            return list((await db.execute(select(ApiKey).where(ApiKey.user_id == user_id)
                                          .order_by(ApiKey.created_at.desc(), ApiKey.id)))
                        .scalars().all())

    async def revoke_key(self, user_id: str, key_id: str) -> ApiKey:
        """Revoke the user's key (for good); another user's key is as absent as a missing one."""
        async with self.sessions() as db:
            res = await db.execute(update(ApiKey).where(ApiKey.id == key_id,
                                                        ApiKey.user_id == user_id)
                                   .values(revoked=True))
            if res.rowcount != 1:
                raise AccountError(404, "api_key_not_found", f"no API key {key_id[:64]!r}",
                                   "key_id")
            await db.commit()
            if self.key_cache is not None:
                self.key_cache.evict(key_id)
            return await db.get(ApiKey, key_id)
