"""Agent sessions (docs/sessions.md): a conversation with an agent in one sandbox of its own,
over a WebSocket, until its TTL or a DELETE.

A session is a row (who, which agent, which scope, its state) and, while active, a `Live` in
memory: its sandbox, its WebSocket connection, where its LLM values come from. The agent and its
events are the agents' machinery (agents/tasks.py): the session's sandbox is attached with
`session=True`, so it is kept between tasks and numbered events run on over all of them; the
WebSocket serves that feed. The sandbox mounts the workspace of (tenant, user_id, app.id,
app.set_id), so an end user's files outlive the session.

The LLM key comes from the tenant's secret bundles (stored encrypted) or the create request
(which wins); neither is written anywhere by the session. When a bundle is replaced, every
active session that names it gets the new values (`rekey`): at once on the replica that took
the change, within TTL_CHECK on the others; its next request to the provider uses them.

Replicas (Kubernetes backend, docs/kubernetes.md "Sessions"): a session's agent is in the
memory of the replica that created it, which the row names. The row is the truth about the rest:
any replica ends a session (the holder sees the row ended at its next look and closes its
WebSocket), a WebSocket through another replica is relayed to the holder (api/sessions.py), and
the sessions of a replica that died are ended by the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, AsyncIterator

from sqlalchemy import func, select, update

from e2a.agents import clis, keys
from e2a.agents.own import providers
from e2a.agents.own.tools import CAPABILITIES
from e2a.agents.tasks import AgentConfig, Tasks
from e2a.ids import new_id
from e2a.sandboxes.host import (Catalog, Conflict, CreateFailed, CreateSpec, DeletedDuringCreate,
                                NoCapacity, SandboxHost, Unavailable, UserLimit)
from e2a.sandboxes.records import utcnow
from e2a.sandboxes.states import EndReason
from e2a.sessions.tokens import SessionTokens
from e2a.store.models import ChatSession, SecretBundle, Task, TaskEvent
from e2a.templates import recipes
from e2a.workspaces.scope import Scope

log = logging.getLogger("e2a.sessions")

OWN = ("deictic", "e2a")            # e2a's own agent: `deictic` is the hosted service's name
AGENTS = OWN + clis.NAMES
MODEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
# Seconds between looks at this replica's sessions: past their TTL, ended through another
# replica, a bundle they name changed; and between looks for sessions of replicas that died.
TTL_CHECK = 1.0
ORPHANS_EVERY = 5.0
# The ends after which a session's sandbox is gone or going already.
SANDBOX_GONE = ("sandbox_ended", "out_of_credits")
# Held a little past the TTL, so the session (not the reaper) ends its sandbox.
LIFETIME_MARGIN = 120


class SessionError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass
class LlmRequest:
    """What the create request said about the provider (each part wins over the bundles')."""

    vendor: str | None = None
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None

    def __repr__(self) -> str:  # never the key
        return f"LlmRequest(vendor={self.vendor!r}, model={self.model!r})"


@dataclass
class Llm:
    """The provider a session's agent uses, resolved from the request and the bundles."""

    key: str
    vendor: str
    model: str | None
    base_url: str
    compatible: bool

    def __repr__(self) -> str:
        return f"Llm(vendor={self.vendor!r}, model={self.model!r})"


@dataclass
class SessionSpec:
    user_id: str
    end_user_id: str
    app_id: str
    set_id: str
    capabilities: list[str] | None
    agent: str
    version: str | None
    template: str
    llm: LlmRequest
    secrets: list[str]
    ttl: int
    system_prompt: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class Live:
    """An active session, in memory."""

    id: str
    user_id: str
    sandbox_id: str
    expires_at: datetime
    agent: str
    secrets: list[str]
    llm: LlmRequest
    connection: Any = None            # the WebSocket served now (a newer one takes over)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str | None = None
    # the version of each bundle it names that its values come from: (row id, version), None
    # for a bundle that is not there
    bundles: dict[str, tuple[str, int] | None] = field(default_factory=dict)
    noting: asyncio.Lock = field(default_factory=asyncio.Lock)  # (note_connected)
    closing: asyncio.Task | None = None  # its end in this replica, once begun (_close)


class Sessions:
    def __init__(self, sessions, host: SandboxHost, catalog: Catalog, tasks: Tasks, bundles,
                 tokens: SessionTokens, settings, check_url):
        """`check_url(url, field)`: the SSRF guard for a caller's LLM base URL (returns the URL,
        raises SessionError); `bundles`: the tenant's secret bundles (secrets/bundles.py)."""
        self.db = sessions
        self.host, self.catalog, self.tasks = host, catalog, tasks
        self.bundles, self.tokens = bundles, tokens
        self.settings = settings
        self.check_url = check_url
        self.live: dict[str, Live] = {}
        self.by_sandbox: dict[str, str] = {}
        # a lock per tenant for looks at its bundles' versions, and how many it has had
        self._bundle_locks: dict[str, asyncio.Lock] = {}
        self._bundle_looks: dict[str, int] = {}
        self._loops: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        host.on_stop(self._sandbox_stopping)
        bundles.on_change(self._bundle_changed)

    # ---- lifetime ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Sessions whose e2a stopped cannot go on (an inline key and the conversation were in
        its memory): they end, and their sandboxes with them. With one process: every session
        active at its start. With replicas: those of replicas that are gone (a replica takes a
        new lock key at each start, so its own from before are among them), looked for again
        every ORPHANS_EVERY by each replica."""
        await self._end_orphans()
        self._loops = [asyncio.create_task(self._watch(), name="sessions"),
                       asyncio.create_task(self._watch_bundles(), name="session bundles")]

    async def stop(self) -> None:
        # (uvicorn has closed the WebSockets already, with 1012: service restart)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _watch(self) -> None:
        """This replica's sessions past their TTL end, and those ended through another replica
        are closed here; with replicas, the sessions of replicas that died end."""
        orphans_at = time.monotonic() + ORPHANS_EVERY
        while True:
            await asyncio.sleep(TTL_CHECK)
            now = utcnow()
            for live in list(self.live.values()):
                if live.expires_at <= now and live.end_reason is None:
                    self._in_background(self.end(live.id, "ttl_expired"))
            try:
                await self._look_at_own()
                if self.host.replica_key() is not None and time.monotonic() >= orphans_at:
                    orphans_at = time.monotonic() + ORPHANS_EVERY
                    await self._end_orphans()
            except Exception as exc:  # the database blinked: the next look tries again
                log.warning("looking at sessions: %s", type(exc).__name__)

    async def _watch_bundles(self) -> None:
        """Bundle changes made through another replica (a loop of its own: a slow provider
        URL's check must not hold up the TTLs)."""
        while True:
            await asyncio.sleep(TTL_CHECK)
            try:
                await self.refresh_bundles()
            except Exception as exc:  # (its class only: an exception's text could quote a value)
                log.warning("looking at session bundles: %s", type(exc).__name__)

    async def _look_at_own(self) -> None:
        """The rows of this replica's sessions: those ended through another replica are closed
        here; with replicas, each names this replica's key now (one taken anew after a database
        blink, or read by a create just before it changed)."""
        ids = [i for i, live in self.live.items() if live.end_reason is None]
        if not ids:
            return
        mine = self.host.replica_key()
        async with self.db() as db:
            if mine is not None:
                await db.execute(update(ChatSession).where(
                    ChatSession.id.in_(ids), ChatSession.state == "active",
                    ChatSession.replica != mine).values(replica=mine))
                await db.commit()
            ended = (await db.execute(select(ChatSession.id, ChatSession.end_reason).where(
                ChatSession.id.in_(ids), ChatSession.state == "ended"))).all()
        for sid, reason in ended:
            live = self.live.get(sid)
            if live is not None:
                self._in_background(self._close(live, reason or "deleted",
                                                reason in SANDBOX_GONE))

    async def _end_orphans(self) -> None:
        mine = self.host.replica_key()
        async with self.db() as db:
            rows = (await db.execute(select(ChatSession.id, ChatSession.replica).where(
                ChatSession.state == "active"))).all()
        gone: dict[int | None, bool] = {}
        for sid, replica in rows:
            if sid in self.live:
                continue
            try:
                if mine is not None:  # (this replica's own key is never gone)
                    if replica not in gone:
                        gone[replica] = await self.host.replica_gone(replica)
                    if not gone[replica]:
                        continue
                await self.end(sid, "server_restart", wait=False)
            except Exception as exc:  # the next look tries again
                log.warning("ending orphaned session %s: %s", sid, type(exc).__name__)

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- create and end ----------------------------------------------------------------------

    async def create(self, spec: SessionSpec) -> tuple[ChatSession, str]:
        """Start a session: its sandbox running, its agent attached. Returns the row and the
        WebSocket's JWT. Raises SessionError."""
        recipe = self._check_template(spec)
        version = self._check_agent(spec)
        capabilities = self._check_capabilities(spec, recipe)
        # read before the values: a change after it is applied at the next look
        versions = await self._bundle_versions({spec.user_id})
        llm = await self.resolve_llm(spec.user_id, spec.agent, spec.secrets, spec.llm)
        sid, now = new_id("ses"), utcnow()
        row = ChatSession(
            id=sid, user_id=spec.user_id, end_user_id=spec.end_user_id, app_id=spec.app_id,
            set_id=spec.set_id, capability_sets=capabilities, agent=spec.agent,
            agent_version=version, template=spec.template, vendor=llm.vendor,
            model=llm.model or (providers.DEFAULT_MODELS.get(llm.vendor)
                                if spec.agent in OWN else None),
            secrets=list(spec.secrets), metadata_=dict(spec.metadata), sandbox_id=None,
            state="active", created_at=now, expires_at=now + timedelta(seconds=spec.ttl),
            replica=self.host.replica_key(),
            replica_url=self.tasks.own_url if self.host.replica_key() is not None else None)
        async with self.db() as db:
            db.add(row)
            await db.commit()
        try:
            rec = await self._sandbox(spec, sid)
        except BaseException:
            async with self.db() as db:
                await db.delete(await db.get(ChatSession, sid))
                await db.commit()
            raise
        live = Live(id=sid, user_id=spec.user_id, sandbox_id=rec.id, expires_at=row.expires_at,
                    agent=spec.agent, secrets=list(spec.secrets), llm=spec.llm,
                    bundles={n: versions.get((spec.user_id, n)) for n in spec.secrets})
        try:
            await self.tasks.attach(rec.id, spec.user_id, spec.template, AgentConfig(
                agent="e2a" if spec.agent in OWN else spec.agent, vendor=llm.vendor, key=llm.key,
                model=llm.model, base_url=llm.base_url, compatible=llm.compatible,
                system_prompt=spec.system_prompt, session=True,
                capabilities=tuple(capabilities) if spec.agent in OWN else None))
            async with self.db() as db:
                row = await db.get(ChatSession, sid)
                row.sandbox_id = rec.id
                await db.commit()
        except BaseException:
            await self.host.destroy(rec.id, EndReason.CREATE_FAILED)
            async with self.db() as db:
                await db.delete(await db.get(ChatSession, sid))
                await db.commit()
            raise
        self.live[sid] = live
        self.by_sandbox[rec.id] = sid
        if row.state != "active":  # ended (a DELETE, any replica) while it started
            await self._close(live, row.end_reason or "deleted", False)
            raise SessionError(409, "session_ended", f"session {sid} was ended "
                               f"({row.end_reason}) while it started")
        if spec.secrets:  # a bundle changed while it started: the new values now
            await self.refresh_bundles({spec.user_id})
        return row, self.tokens.issue(sid, spec.user_id, row.expires_at)

    def _check_template(self, spec: SessionSpec):
        if spec.template not in recipes.available():
            raise SessionError(400, "invalid_field", f"template {spec.template!r} is not "
                               f"available (available: {', '.join(recipes.available())})",
                               "template")
        return recipes.load(spec.template)

    def _check_agent(self, spec: SessionSpec) -> str:
        """The agent's version, as installed; 400 for an unknown agent or another version."""
        if spec.agent not in AGENTS:
            raise SessionError(400, "invalid_field", f"agent.kind {spec.agent!r} is not "
                               f"available (available: {', '.join(AGENTS)})", "agent.kind")
        installed = agent_version(spec.agent)
        if spec.version not in (None, "latest", installed):
            raise SessionError(400, "invalid_field", f"{spec.agent} {spec.version} is not "
                               f"installed (this e2a runs {installed}; give it, \"latest\" or "
                               "null)", "agent.version")
        return installed

    def _check_capabilities(self, spec: SessionSpec, recipe) -> list[str]:
        offered = ["shell", "files"]
        if "cdp" in recipe.endpoints:
            offered.append("browser")
        if "vnc_view" in recipe.endpoints:
            offered.append("computer")
        asked = spec.capabilities
        if asked is None:
            return offered
        if len(set(asked)) != len(asked):
            raise SessionError(400, "invalid_field", "a capability set is named twice",
                               "app.capability_sets")
        for name in asked:
            if name not in offered:
                raise SessionError(400, "invalid_field", f"the {spec.template} template has no "
                                   f"{name} (it offers {', '.join(offered)})",
                                   "app.capability_sets")
        if spec.agent not in OWN and set(asked) != set(offered):
            raise SessionError(400, "invalid_field", "capability_sets can limit e2a's own agent "
                               f"only; {spec.agent} has every tool of its sandbox",
                               "app.capability_sets")
        return [c for c in CAPABILITIES if c in asked]

    async def _sandbox(self, spec: SessionSpec, session_id: str):
        try:
            return await self.host.create(CreateSpec(
                user_id=spec.user_id, template=spec.template, env_vars={},
                metadata={"e2a.session": session_id}, idle_timeout=spec.ttl + LIFETIME_MARGIN,
                max_lifetime=spec.ttl + LIFETIME_MARGIN, internet=True, params={},
                workspace=Scope(user_id=spec.user_id, end_user_id=spec.end_user_id,
                                app_id=spec.app_id, capset_id=spec.set_id)))
        except NoCapacity as exc:
            raise SessionError(503, "no_capacity", str(exc)) from exc
        except UserLimit as exc:
            raise SessionError(429, "sandbox_limit", str(exc)) from exc
        except Conflict as exc:
            raise SessionError(409, "workspace_busy", str(exc), "user_id") from exc
        except (Unavailable, CreateFailed, DeletedDuringCreate) as exc:
            raise SessionError(503, "create_failed", str(exc)) from exc

    async def end(self, session_id: str, reason: str, wait: bool = True,
                  sandbox_going: bool = False) -> None:
        """End an active session, whichever replica holds it: its row first (once: another
        end, through any replica, changes nothing), then its task cancelled, its WebSocket
        closed (4000), its sandbox destroyed (the workspace flushed first; in the background
        unless `wait`; not at all if `sandbox_going`, an end that comes from the sandbox's).
        Another replica's session is closed there at its next look."""
        async with self.db() as db:
            done = await db.execute(update(ChatSession).where(
                ChatSession.id == session_id, ChatSession.state == "active").values(
                    state="ended", ended_at=utcnow(), end_reason=reason, connected=False))
            await db.commit()
            sandbox_id, replica = (await db.execute(select(
                ChatSession.sandbox_id, ChatSession.replica).where(
                    ChatSession.id == session_id))).one_or_none() or (None, None)
        if done.rowcount == 0:
            return
        going = sandbox_going or reason in SANDBOX_GONE
        live = self.live.get(session_id)
        if live is not None:
            await self._close(live, reason, going)
        elif sandbox_id is not None and not going:
            # another replica's (or a dead one's): its live replica cancels the task at its
            # next look, and is waited for; the sandbox can be ended from here
            if await self.host.replica_alive_now(replica):
                await self.tasks.cancel(sandbox_id, f"the session ended ({reason})")
            destroying = self.host.destroy(sandbox_id, EndReason.SESSION_ENDED
                                           if reason != "server_restart"
                                           else EndReason.SERVER_RESTART)
            if wait:
                await destroying
            else:
                self._in_background(destroying)

    async def _close(self, live: Live, reason: str, sandbox_going: bool) -> None:
        """What ends with a session in this replica: its task, its WebSocket, its sandbox.
        Once, whoever asks first (an end here, or the look that saw it ended elsewhere); every
        caller returns when it is done."""
        if live.closing is None:
            live.end_reason = reason
            live.closing = asyncio.get_running_loop().create_task(
                self._teardown(live, reason, sandbox_going))
            self._background.add(live.closing)
            live.closing.add_done_callback(self._background.discard)
        await asyncio.shield(live.closing)

    async def _teardown(self, live: Live, reason: str, sandbox_going: bool) -> None:
        await self.tasks.cancel(live.sandbox_id, f"the session ended ({reason})")
        live.ended.set()
        await self.tasks.wake(live.sandbox_id)
        try:
            if not sandbox_going:
                await self.host.destroy(live.sandbox_id, EndReason.SESSION_ENDED)
        finally:
            self.live.pop(live.id, None)
            self.by_sandbox.pop(live.sandbox_id, None)

    def _sandbox_stopping(self, sandbox_id: str, reason: EndReason) -> None:
        """A session's sandbox that ends for another reason (it crashed, a DELETE of the
        sandbox) ends the session; with replicas, also another replica's session, whose
        sandbox's end this one may be the one to see."""
        if reason is EndReason.SESSION_ENDED:
            return
        why = {EndReason.OUT_OF_CREDITS: "out_of_credits",
               EndReason.SERVER_RESTART: "server_restart"}.get(reason, "sandbox_ended")
        sid = self.by_sandbox.get(sandbox_id)
        if sid is not None:
            self._in_background(self.end(sid, why, sandbox_going=True))
        elif self.host.replica_key() is not None:
            self._in_background(self._end_of_sandbox(sandbox_id, why))

    async def _end_of_sandbox(self, sandbox_id: str, why: str) -> None:
        async with self.db() as db:
            sid = await db.scalar(select(ChatSession.id).where(
                ChatSession.sandbox_id == sandbox_id, ChatSession.state == "active"))
        if sid is not None:
            await self.end(sid, why, sandbox_going=True)

    async def note_connected(self, live: Live) -> None:
        """Whether a client is connected to the session now (its WebSocket is here, relayed or
        not), in its row for GETs through every replica. One write at a time, each of the state
        at its time: the last one written is the last state."""
        async with live.noting:
            try:
                async with self.db() as db:
                    await db.execute(update(ChatSession).where(
                        ChatSession.id == live.id, ChatSession.state == "active").values(
                            connected=live.connection is not None))
                    await db.commit()
            except Exception as exc:  # (the connection goes on; GETs may say otherwise)
                log.warning("session %s: noting its connection: %s", live.id,
                            type(exc).__name__)

    async def holder(self, row: ChatSession) -> tuple[str, int] | None:
        """(the API, the lock key) of the replica that holds the session, when it is another
        and alive at this moment (a dead one's address may be any pod's)."""
        if row.id in self.live or not await self.tasks.other_replica(row.replica,
                                                                     row.replica_url):
            return None
        return row.replica_url, row.replica

    # ---- the LLM key and hot replace ---------------------------------------------------------

    async def resolve_llm(self, user_id: str, agent: str, secrets: list[str],
                          asked: LlmRequest) -> Llm:
        """The provider and key from the request and the named bundles (the request wins).
        Raises SessionError (400 naming the field, 404 for an unknown bundle)."""
        values = await self._bundle_values(user_id, secrets) if secrets else {}
        origin = "secrets"  # where a value that fails a check came from, for the error's field
        key = (asked.api_key or values.get("LLM_API_KEY") or "").strip()
        if not key:
            raise SessionError(400, "missing_field", "no LLM key: give llm.api_key or name a "
                               "secret bundle holding LLM_API_KEY", "llm.api_key")
        problem = keys.problem(key)
        if problem:
            raise SessionError(400, "invalid_field", f"the LLM key {problem}",
                               "llm.api_key" if asked.api_key else origin)
        vendor = asked.vendor or values.get("LLM_VENDOR") or None
        if vendor is not None and vendor not in providers.VENDORS:
            raise SessionError(400, "invalid_field", f"LLM_VENDOR must be one of "
                               f"{', '.join(providers.VENDORS)}", origin)
        model = asked.model or values.get("LLM_MODEL") or None
        if model is not None and not (1 <= len(model) <= 128 and set(model) <= MODEL_CHARS):
            raise SessionError(400, "invalid_field", "LLM_MODEL must match "
                               "^[a-zA-Z0-9._-]{1,128}$", origin)
        base_url = asked.base_url or values.get("LLM_BASE_URL") or None
        field_ = "llm.base_url" if asked.base_url else origin
        cli = clis.get(agent)
        if cli is not None:
            if vendor not in (None, cli.vendor):
                raise SessionError(400, "invalid_field", f"{agent} talks to {cli.vendor}, not "
                                   f"{vendor}", "llm.vendor" if asked.vendor else origin)
            problem = cli.check_model(model)
            if problem:
                raise SessionError(400, "invalid_field", problem,
                                   "llm.model" if asked.model else origin)
            if base_url:
                base_url = await self.check_url(base_url, field_)
            return Llm(key=key, vendor=cli.vendor, model=model, base_url=base_url or "",
                       compatible=False)
        compatible = False
        if base_url:
            base_url = await self.check_url(base_url, field_)
            compatible = vendor in (None, "openai")
            vendor = vendor or "openai"
        vendor = vendor or providers.infer_vendor(model, key)
        if vendor is None:
            raise SessionError(400, "invalid_field", "cannot tell the provider from the model or "
                               "the key: set llm.vendor (anthropic, openai, google or deepseek)",
                               "llm.vendor")
        return Llm(key=key, vendor=vendor, model=model,
                   base_url=base_url or getattr(self.settings, f"llm_{vendor}_url"),
                   compatible=compatible)

    async def _bundle_values(self, user_id: str, names: list[str]) -> dict[str, str]:
        from e2a.secrets.bundles import SecretsError
        try:
            return await self.bundles.resolve(user_id, names)
        except SecretsError as exc:
            raise SessionError(exc.status, exc.code, exc.message, exc.field) from None

    async def _bundle_changed(self, user_id: str, name: str) -> None:
        """Hot replace: the active sessions naming the bundle get its new values now (those
        of other replicas at their next look)."""
        await self.refresh_bundles({user_id})

    async def refresh_bundles(self, users: set[str] | None = None) -> None:
        """The sessions here whose bundles changed since their values were read (through any
        replica: the versions are in the rows) get the new values: of `users` (a change made
        through this replica, a create), their versions read now; or of all (the look every
        TTL_CHECK), in one read. One look at a tenant's at a time (two would apply one change
        twice), a slow one holding up no other tenant's; versions are read before the values
        they are kept for, and a look whose read is older than a look done since skips."""
        versions, looks = None, {}
        if users is None:
            users = {live.user_id for live in self.live.values() if live.secrets}
            looks = {u: self._bundle_looks.get(u, 0) for u in users}
            versions = await self._bundle_versions(users) if users else {}
        for user in users:
            lock = self._bundle_locks.setdefault(user, asyncio.Lock())
            async with lock:
                if versions is None:
                    await self._apply_versions(user, await self._bundle_versions({user}))
                elif self._bundle_looks.get(user, 0) == looks[user]:
                    await self._apply_versions(user, versions)
                else:
                    continue  # looked at since, with versions read after these
                self._bundle_looks[user] = self._bundle_looks.get(user, 0) + 1
            if not any(live.user_id == user for live in self.live.values()):
                self._bundle_locks.pop(user, None)
                self._bundle_looks.pop(user, None)

    async def _apply_versions(self, user: str, versions: dict) -> None:
        for live in [lv for lv in self.live.values() if lv.user_id == user and lv.secrets]:
            now = {n: versions.get((user, n)) for n in live.secrets}
            changed = [n for n in live.secrets if live.bundles.get(n) != now[n]]
            if not changed or live.end_reason:
                continue
            try:
                await self._apply(live, ", ".join(changed))
            except Exception as exc:  # kept as it was: the next look tries again
                log.warning("session %s: applying a changed bundle: %s", live.id,
                            type(exc).__name__)
                continue
            live.bundles.update(now)  # (its values were read after these versions)

    async def _bundle_versions(self, users: set[str]) -> dict[tuple[str, str], tuple[str, int]]:
        """(tenant, bundle name) → (its row, its version): a replaced bundle has a new version,
        a deleted and created again one a new row."""
        async with self.db() as db:
            rows = (await db.execute(select(SecretBundle.user_id, SecretBundle.name,
                                            SecretBundle.id, SecretBundle.version).where(
                SecretBundle.user_id.in_(users)))).all()
        return {(u, n): (i, v) for u, n, i, v in rows}

    async def _apply(self, live: Live, name: str) -> None:
        """The session's LLM values resolved again and handed to its agent. One that cannot
        take them (the bundle was deleted, or now collides or fails a check) keeps what it had
        and hears so in a numbered `error` event; why is for the tenant (the server's log), not
        for the end user holding the session's token."""
        s = self.tasks.session(live.sandbox_id)
        if s is None:
            return
        try:
            llm = await self.resolve_llm(live.user_id, live.agent, live.secrets, live.llm)
        except SessionError as exc:
            log.info("session %s: secret bundle %s changed but was not applied: %s", live.id,
                     name, exc.message)
            await self.tasks.emit(s, "error", {
                "code": "secrets_not_applied",
                "message": f"secret bundle {name!r} changed, but its new values could not be "
                           "used: the session keeps the ones it had"})
            return
        self.tasks.rekey(live.sandbox_id, llm.key, vendor=llm.vendor, model=llm.model,
                         base_url=llm.base_url, compatible=llm.compatible)
        await self.tasks.emit(s, "secrets_replaced", {"bundle": name})
        log.info("session %s: secret bundle %s replaced, applied", live.id, name)

    # ---- reading -----------------------------------------------------------------------------

    async def get(self, user_id: str, session_id: str) -> ChatSession | None:
        async with self.db() as db:
            row = await db.get(ChatSession, session_id)
        return row if row is not None and row.user_id == user_id else None

    async def list(self, user_id: str, state: str | None, end_user_id: str | None,
                   limit: int = 100, offset: int = 0) -> list[ChatSession]:
        """The tenant's sessions, newest first, a page at a time."""
        q = select(ChatSession).where(ChatSession.user_id == user_id)
        if state:
            q = q.where(ChatSession.state == state)
        if end_user_id:
            q = q.where(ChatSession.end_user_id == end_user_id)
        q = q.order_by(ChatSession.created_at.desc(), ChatSession.id).limit(limit).offset(offset)
        async with self.db() as db:
            return list((await db.execute(q)).scalars())

    async def usage(self, row: ChatSession) -> dict:
        if row.sandbox_id is None:
            return {"tasks": 0, "llm_requests": 0, "input_tokens": 0, "output_tokens": 0,
                    "events": 0}
        async with self.db() as db:
            tasks, requests, tin, tout = (await db.execute(select(
                func.count(Task.id), func.coalesce(func.sum(Task.llm_requests), 0),
                func.coalesce(func.sum(Task.input_tokens), 0),
                func.coalesce(func.sum(Task.output_tokens), 0)).where(
                Task.sandbox_id == row.sandbox_id))).one()
            events = (await db.execute(select(func.max(TaskEvent.seq)).where(
                TaskEvent.sandbox_id == row.sandbox_id))).scalar() or 0
        return {"tasks": tasks, "llm_requests": int(requests), "input_tokens": int(tin),
                "output_tokens": int(tout), "events": events}

    async def latest_task(self, row: ChatSession) -> Task | None:
        if row.sandbox_id is None:
            return None
        return await self.tasks.latest(row.sandbox_id)

    async def follow(self, live: Live, after: int) -> AsyncIterator[TaskEvent]:
        """The session's numbered events after `after`, as stored, then live until it ends;
        then what was stored up to its end."""
        async for e in self.tasks.follow(live.sandbox_id, after, until=live.ended.is_set):
            yield e
            after = e.seq
        await live.ended.wait()  # (its sandbox went first: the session's end is on its way)
        async for e in self.tasks.follow(live.sandbox_id, after, until=lambda: True):
            yield e


def agent_version(agent: str) -> str:
    """The version of an agent this e2a runs: e2a's own, or the CLI's pin in the image."""
    if agent in OWN:
        from e2a import __version__
        return __version__
    package = {"claude-code": "@anthropic-ai/claude-code", "codex": "@openai/codex",
               "gemini-cli": "@google/gemini-cli"}[agent]
    for pin in recipes.load("standard").npm:
        name, _, version = pin.rpartition("@")
        if name == package:
            return version
    return "unknown"
