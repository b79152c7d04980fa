"""Users and API keys: keys are shown once and stored only as a sha256 hash."""

from __future__ import annotations

import hashlib
import secrets
import string
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from e2a.billing import ledger
from e2a.ids import new_id
from e2a.store.models import ApiKey, User

KEY_PREFIX = "e2a_live_"
_KEY_ALPHABET = string.ascii_letters + string.digits


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def now() -> datetime:
    return datetime.now(timezone.utc)


async def create_user(db: AsyncSession, email: str, free_credits: int,
                      is_admin: bool = False) -> User:
    """A new user, whose account opens with `free_credits` (E2A_FREE_CREDITS)."""
    user = User(id=new_id("usr"), email=email, is_admin=is_admin, created_at=now())
    db.add(user)
    await db.flush()
    await ledger.ensure_account(db, user.id, free_credits)
    return user


async def create_key(db: AsyncSession, user_id: str) -> tuple[ApiKey, str]:
    """Returns the row and the secret, which is never stored and never shown again."""
    secret = KEY_PREFIX + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(32))
    row = ApiKey(
        id=new_id("key"),
        user_id=user_id,
        prefix=secret[: len(KEY_PREFIX) + 4],
        key_hash=hash_key(secret),
        revoked=False,
        plan_tier="free",
        created_at=now(),
    )
    db.add(row)
    await db.flush()
    return row, secret


@dataclass(frozen=True)
class Caller:
    """Who made a request: the user (`id`), how they authenticated (`via`: "key" for an API key,
    "login" for the login JWT of docs/accounts.md) and the key they used (None for a login)."""

    id: str
    key_id: str | None
    via: str = "key"


async def caller_for_key(db: AsyncSession, key: str) -> Caller | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        return None
    row = (
        await db.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    ).scalar_one_or_none()
    if row is None or row.revoked:
        return None
    return Caller(id=row.user_id, key_id=row.id)


class KeyCache:
    """Valid keys seen in the last `ttl` seconds, so the hot path (an exec is one request) makes
    at most one database query per key and `ttl`. A key revoked through this process is evicted
    at once (`evict`); one revoked elsewhere (another replica, `e2a admin revoke-key`) stops
    working within `ttl` seconds. Unknown keys are never cached."""

    def __init__(self, ttl: float = 0.5):
        self.ttl = ttl
        self._entries: dict[str, tuple[Caller, float]] = {}
        self._hashes: dict[str, str] = {}       # key id -> hash of the key, for evict
        # Keys evicted in the last `ttl` seconds: a lookup that read the key from the database
        # just before its revocation was committed must not put it back.
        self._evicted: dict[str, float] = {}

    def get(self, key: str) -> Caller | None:
        hit = self._entries.get(hash_key(key))
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, key: str, caller: Caller) -> None:
        now = time.monotonic()
        if caller.key_id in self._evicted:
            if self._evicted[caller.key_id] >= now:
                return
            del self._evicted[caller.key_id]
        if len(self._entries) > 100_000:
            self._entries.clear()
            self._hashes.clear()
        digest = hash_key(key)
        self._entries[digest] = (caller, now + self.ttl)
        if caller.key_id:
            self._hashes[caller.key_id] = digest

    def evict(self, key_id: str) -> None:
        """Forget the key with this id at once (it was just revoked)."""
        now = time.monotonic()
        if len(self._evicted) > 10_000:
            self._evicted = {k: t for k, t in self._evicted.items() if t >= now}
        self._evicted[key_id] = now + self.ttl
        digest = self._hashes.pop(key_id, None)
        if digest is not None:
            self._entries.pop(digest, None)
