"""A tenant's secret bundles: named sets of secrets (LLM_API_KEY, LLM_BASE_URL, LLM_MODEL, ...)
kept encrypted (crypto.py) and merged into a session's values when it starts (`resolve`).

Nothing here returns, logs or puts in an error a value: callers get names, key names, versions
and times. A replace (PUT) or delete tells the listeners (`on_change`) once it has committed, so
that running sessions take the new values at once (hot replace).
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete as sql_delete
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from e2a.agents import keys
from e2a.ids import new_id
from e2a.sandboxes.records import aware, utcnow
from e2a.secrets.crypto import SealError, SecretBox
from e2a.store.models import SecretBundle

log = logging.getLogger("e2a.secrets")

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
KEY_PATTERN = r"^[A-Z_][A-Z0-9_]{0,127}$"
NAME_RE = re.compile(NAME_PATTERN.strip("^$"))
KEY_RE = re.compile(KEY_PATTERN.strip("^$"))
REQUIRED_KEY = "LLM_API_KEY"
MAX_BUNDLES = 50           # per tenant
MAX_KEYS = 50              # per bundle
MAX_VALUE_BYTES = 65536    # per value, UTF-8
MAX_PER_SESSION = 10       # bundles one session may name

Listener = Callable[[str, str], Awaitable[Any]]


class SecretsError(Exception):
    """A request about bundles that cannot be done: status, e2a error code, message, field.
    No message holds a secret value."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass(frozen=True)
class BundleInfo:
    """What may be shown of a bundle: never a value."""
    name: str
    keys: list[str]
    version: int
    created_at: datetime
    updated_at: datetime


def _info(row: SecretBundle) -> BundleInfo:
    return BundleInfo(name=row.name, keys=list(row.key_names), version=row.version,
                      created_at=aware(row.created_at), updated_at=aware(row.updated_at))


def shown(text: str, limit: int = 64) -> str:
    """A caller's name or key as an error may show it: cut short, so a huge one is not echoed."""
    return text if len(text) <= limit else text[:limit] + "..."


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SecretsError(400, "invalid_field", f"name must match {NAME_PATTERN} (lowercase "
                           "letters, digits and hyphens, at most 63)", "name")
    return name


def check_values(values: Any) -> dict[str, str]:
    """The bundle's values, checked: every error names its key (`values.KEY`), never a value."""
    if not isinstance(values, dict):
        raise SecretsError(400, "invalid_field", "values must be a JSON object of names and "
                           "strings", "values")
    if len(values) > MAX_KEYS:
        raise SecretsError(400, "too_many_keys", f"a bundle holds at most {MAX_KEYS} keys "
                           f"(this one has {len(values)})", "values")
    for key, value in values.items():
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            field = f"values.{shown(str(key))}"
            raise SecretsError(400, "invalid_field", f"{field}: a key must match {KEY_PATTERN} "
                               "(upper-case letters, digits and underscores)", field)
        field = f"values.{key}"
        if not isinstance(value, str):
            raise SecretsError(400, "invalid_field", f"{field} must be a string", field)
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON)
            raise SecretsError(400, "invalid_field", f"{field} is not valid Unicode text (a lone "
                               "surrogate)", field) from None
        if size > MAX_VALUE_BYTES:
            raise SecretsError(400, "value_too_large", f"{field} is {size} bytes: a value is "
                               f"at most {MAX_VALUE_BYTES} bytes (UTF-8)", field)
    if REQUIRED_KEY not in values:
        raise SecretsError(400, "missing_field", f"values.{REQUIRED_KEY} is required (the LLM "
                           "key, whatever the vendor)", f"values.{REQUIRED_KEY}")
    problem = keys.problem(values[REQUIRED_KEY])
    if problem:  # it goes in an HTTP header: a line break would be echoed in an error
        raise SecretsError(400, "invalid_field", f"values.{REQUIRED_KEY} {problem}",
                           f"values.{REQUIRED_KEY}")
    if "LLM_BASE_URL" in values and not _http_url(values["LLM_BASE_URL"]):
        # The whole check (a public address, no redirects) is made when a session starts.
        raise SecretsError(400, "invalid_field", "values.LLM_BASE_URL must be an http(s) URL "
                           "such as https://api.example.com/v1", "values.LLM_BASE_URL")
    return dict(values)


def _http_url(url: str) -> bool:
    if not url or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class Bundles:
    """The tenants' bundles in the store, sealed with `box` (crypto.SecretBox)."""

    def __init__(self, sessions, box: SecretBox):
        self.db = sessions
        self.box = box
        self._listeners: list[Listener] = []
        # One writer per tenant at a time: the count limit and the version are exact.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def on_change(self, listener: Listener) -> None:
        """`await listener(user_id, name)` after each replace or delete has committed."""
        self._listeners.append(listener)

    def _lock(self, user_id: str) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = self._locks[user_id] = asyncio.Lock()
        return lock

    async def _seal(self, user_id: str, name: str, values: dict[str, str]) -> str:
        return await asyncio.to_thread(self.box.seal, user_id, name, values)

    # ---- writing --------------------------------------------------------------------------

    async def create(self, user_id: str, name: str, values: Any) -> BundleInfo:
        check_name(name)
        values = check_values(values)
        ciphertext = await self._seal(user_id, name, values)
        async with self._lock(user_id):
            async with self.db() as db:
                if await self._row(db, user_id, name) is not None:
                    raise _exists(name)
                count = await db.scalar(select(func.count()).select_from(SecretBundle)
                                        .where(SecretBundle.user_id == user_id))
                if count >= MAX_BUNDLES:
                    raise SecretsError(400, "too_many_bundles", f"a tenant holds at most "
                                       f"{MAX_BUNDLES} secret bundles: delete one first", "name")
                now = utcnow()
                row = SecretBundle(id=new_id("sec"), user_id=user_id, name=name,
                                   key_names=sorted(values), ciphertext=ciphertext, version=1,
                                   created_at=now, updated_at=now)
                db.add(row)
                try:
                    await db.commit()
                except IntegrityError:  # made a moment ago by another process
                    raise _exists(name) from None
        log.info("secret bundle %s of %s created (%d keys)", name, user_id, len(values))
        return _info(row)

    async def replace(self, user_id: str, name: str, values: Any) -> BundleInfo:
        """The whole set replaced (keys not given are gone), version + 1; then the listeners."""
        values = check_values(values)
        ciphertext = await self._seal(user_id, name, values)
        async with self._lock(user_id):
            async with self.db() as db:
                row = await self._row(db, user_id, name)
                if row is None:
                    raise _not_found(name)
                row.ciphertext, row.key_names = ciphertext, sorted(values)
                row.version, row.updated_at = row.version + 1, utcnow()
                await db.commit()
                info = _info(row)
        log.info("secret bundle %s of %s replaced (version %d, %d keys)", name, user_id,
                 info.version, len(values))
        await self._notify(user_id, name)
        return info

    async def delete(self, user_id: str, name: str) -> None:
        async with self._lock(user_id):
            async with self.db() as db:
                res = await db.execute(sql_delete(SecretBundle).where(
                    SecretBundle.user_id == user_id, SecretBundle.name == name))
                await db.commit()
        if not res.rowcount:
            raise _not_found(name)
        log.info("secret bundle %s of %s deleted", name, user_id)
        await self._notify(user_id, name)

    async def _notify(self, user_id: str, name: str) -> None:
        for listener in list(self._listeners):
            try:
                await listener(user_id, name)
            except Exception as exc:  # the change is made; the listener's trouble is its own
                # The class alone: an exception's text could quote a value.
                log.error("secret bundle %s of %s changed, but listener %s failed: %s", name,
                          user_id, getattr(listener, "__qualname__", repr(listener)),
                          exc.__class__.__name__)

    # ---- reading --------------------------------------------------------------------------

    @staticmethod
    async def _row(db: AsyncSession, user_id: str, name: str) -> SecretBundle | None:
        return await db.scalar(select(SecretBundle).where(SecretBundle.user_id == user_id,
                                                          SecretBundle.name == name))

    async def list(self, user_id: str) -> list[BundleInfo]:
        async with self.db() as db:
            rows = (await db.execute(
                select(SecretBundle.name, SecretBundle.key_names, SecretBundle.version,
                       SecretBundle.created_at, SecretBundle.updated_at)
                .where(SecretBundle.user_id == user_id).order_by(SecretBundle.name))).all()
        return [BundleInfo(name=r.name, keys=list(r.key_names), version=r.version,
                           created_at=aware(r.created_at), updated_at=aware(r.updated_at))
                for r in rows]

    async def get(self, user_id: str, name: str) -> BundleInfo:
        """The bundle's metadata (no value); another tenant's is a 404 like a missing one."""
        for info in await self._infos(user_id, [name]):
            return info
        raise _not_found(name)

    async def _infos(self, user_id: str, names: list[str]) -> list[BundleInfo]:
        async with self.db() as db:
            rows = (await db.execute(
                select(SecretBundle.name, SecretBundle.key_names, SecretBundle.version,
                       SecretBundle.created_at, SecretBundle.updated_at)
                .where(SecretBundle.user_id == user_id, SecretBundle.name.in_(names)))).all()
        return [BundleInfo(name=r.name, keys=list(r.key_names), version=r.version,
                           created_at=aware(r.created_at), updated_at=aware(r.updated_at))
                for r in rows]

    async def resolve(self, user_id: str, names: list[str]) -> dict[str, str]:
        """The merged values of the named bundles, for a session. Raises SecretsError:
        400 `too_many_secrets` (more than 10 names), 400 a name given twice, 404
        `secret_not_found` (field `secrets[i]`; another tenant's bundle too), 400
        `secret_collision` (one key with different values in two bundles: the error names the
        key and both bundles). A key with the same value in several bundles is merged: every
        bundle holds LLM_API_KEY, so two bundles over one LLM key would otherwise collide."""
        names = list(names)
        if len(names) > MAX_PER_SESSION:
            raise SecretsError(400, "too_many_secrets", f"a session names at most "
                               f"{MAX_PER_SESSION} secret bundles ({len(names)} given)", "secrets")
        seen: set[str] = set()
        for i, name in enumerate(names):
            if not isinstance(name, str):
                raise SecretsError(400, "invalid_field", f"secrets[{i}] must be a bundle name",
                                   f"secrets[{i}]")
            if name in seen:
                raise SecretsError(400, "invalid_field", f"secrets names the bundle "
                                   f"{shown(name)!r} twice", "secrets")
            seen.add(name)
        if not names:
            return {}
        async with self.db() as db:
            rows = {r.name: r for r in (await db.execute(
                select(SecretBundle.name, SecretBundle.ciphertext).where(
                    SecretBundle.user_id == user_id, SecretBundle.name.in_(names)))).all()}
        for i, name in enumerate(names):
            if name not in rows:
                raise SecretsError(404, "secret_not_found", f"no secret bundle {shown(name)!r}",
                                   f"secrets[{i}]")
        merged: dict[str, str] = {}
        origin: dict[str, str] = {}
        for i, name in enumerate(names):
            try:
                values = await asyncio.to_thread(self.box.open, user_id, name,
                                                 rows[name].ciphertext)
            except SealError as exc:
                log.error("secret bundle %s of %s cannot be opened: it %s", name, user_id, exc)
                raise SecretsError(500, "secret_unreadable", f"secret bundle {name!r} cannot be "
                                   "decrypted by this server (its master key changed?)",
                                   f"secrets[{i}]") from None
            for key, value in values.items():
                if key in merged and merged[key] != value:
                    raise SecretsError(400, "secret_collision", f"key {key} has different values "
                                       f"in secret bundles {origin[key]!r} and {name!r}",
                                       "secrets")
                merged.setdefault(key, value)
                origin.setdefault(key, name)
        return merged


def _not_found(name: str) -> SecretsError:
    return SecretsError(404, "secret_not_found", f"no secret bundle {shown(name)!r}", "name")


def _exists(name: str) -> SecretsError:
    return SecretsError(409, "secret_exists", f"a secret bundle {name!r} exists already: PUT "
                        "replaces its values", "name")


@dataclass
class Rotation:
    rotated: int = 0          # re-encrypted under the current key
    current: int = 0          # already under it
    failed: list[str] | None = None  # ids of rows that do not open (wrong key, tampered, moved)


async def rotate_all(db: AsyncSession, box: SecretBox) -> Rotation:
    """Every bundle re-encrypted under the box's current key (`e2a admin rotate-secrets-key`),
    one row per transaction. Safe beside a running server: a row is only written if its
    ciphertext is still the one read (a PUT in between wins, and is read again)."""
    done = Rotation(failed=[])
    ids = (await db.scalars(select(SecretBundle.id).order_by(SecretBundle.id))).all()
    for row_id in ids:
        for _ in range(5):
            row = (await db.execute(select(SecretBundle.user_id, SecretBundle.name,
                                           SecretBundle.ciphertext)
                                    .where(SecretBundle.id == row_id))).first()
            if row is None:  # deleted meanwhile
                break
            try:
                box.open(row.user_id, row.name, row.ciphertext)
            except SealError as exc:
                log.error("secret bundle %s (%s of %s) cannot be rotated: it %s", row_id,
                          row.name, row.user_id, exc)
                done.failed.append(row_id)
                break
            if box.is_current(row.ciphertext):
                done.current += 1
                break
            new = box.rotate(row.user_id, row.name, row.ciphertext)
            res = await db.execute(update(SecretBundle).where(
                SecretBundle.id == row_id, SecretBundle.ciphertext == row.ciphertext)
                .values(ciphertext=new))
            await db.commit()
            if res.rowcount:
                done.rotated += 1
                break
        else:  # rewritten under us five times running
            done.failed.append(row_id)
    return done
