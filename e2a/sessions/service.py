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
active session that names it gets the new values at once (`rekey`): its next request to the
provider uses them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, AsyncIterator

from sqlalchemy import func, select

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
from e2a.store.models import ChatSession, Task, TaskEvent
from e2a.templates import recipes
from e2a.workspaces.scope import Scope

log = logging.getLogger("e2a.sessions")

OWN = ("deictic", "e2a")            # e2a's own agent: `deictic` is the hosted service's name
AGENTS = OWN + clis.NAMES
MODEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
TTL_CHECK = 1.0                     # seconds between checks for sessions past their TTL
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
        self._changes: dict[str, int] = {}  # bundle changes per tenant, for create's race
        self._ttl: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        host.on_stop(self._sandbox_stopping)
        bundles.on_change(self._bundle_changed)

    # ---- lifetime ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Sessions active when e2a stopped cannot go on (an inline key and the conversation
        were in memory): they end, and their sandboxes with them."""
        async with self.db() as db:
            rows = (await db.execute(select(ChatSession).where(
                ChatSession.state == "active"))).scalars().all()
            for row in rows:
                row.state, row.ended_at, row.end_reason = "ended", utcnow(), "server_restart"
            await db.commit()
        running = set(self.host.list())
        for row in rows:
            if row.sandbox_id in running:
                self._in_background(self.host.destroy(row.sandbox_id, EndReason.SERVER_RESTART))
        self._ttl = asyncio.create_task(self._ttl_loop(), name="session TTLs")

    async def stop(self) -> None:
        # (uvicorn has closed the WebSockets already, with 1012: service restart)
        if self._ttl:
            self._ttl.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _ttl_loop(self) -> None:
        while True:
            await asyncio.sleep(TTL_CHECK)
            now = utcnow()
            for live in list(self.live.values()):
                if live.expires_at <= now and live.end_reason is None:
                    self._in_background(self.end(live.id, "ttl_expired"))

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
        changes = self._changes.get(spec.user_id, 0)
        llm = await self.resolve_llm(spec.user_id, spec.agent, spec.secrets, spec.llm)
        sid, now = new_id("ses"), utcnow()
        row = ChatSession(
            id=sid, user_id=spec.user_id, end_user_id=spec.end_user_id, app_id=spec.app_id,
            set_id=spec.set_id, capability_sets=capabilities, agent=spec.agent,
            agent_version=version, template=spec.template, vendor=llm.vendor,
            model=llm.model or (providers.DEFAULT_MODELS.get(llm.vendor)
                                if spec.agent in OWN else None),
            secrets=list(spec.secrets), metadata_=dict(spec.metadata), sandbox_id=None,
            state="active", created_at=now, expires_at=now + timedelta(seconds=spec.ttl))
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
                    agent=spec.agent, secrets=list(spec.secrets), llm=spec.llm)
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
        if spec.secrets and self._changes.get(spec.user_id, 0) != changes:
            # a bundle changed while this session started: it may have missed the new values
            await self._apply(live, ", ".join(spec.secrets))
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

    async def end(self, session_id: str, reason: str) -> None:
        """End an active session: its task cancelled, its WebSocket closed (4000), its sandbox
        destroyed (the workspace flushed first)."""
        live = self.live.get(session_id)
        if live is None or live.end_reason is not None:
            return
        live.end_reason = reason
        async with self.db() as db:
            row = await db.get(ChatSession, session_id)
            row.state, row.ended_at, row.end_reason = "ended", utcnow(), reason
            await db.commit()
        await self.tasks.cancel(live.sandbox_id, f"the session ended ({reason})")
        live.ended.set()
        await self.tasks.wake(live.sandbox_id)
        try:
            if reason not in ("sandbox_ended", "out_of_credits"):  # its sandbox is going
                await self.host.destroy(live.sandbox_id, EndReason.SESSION_ENDED)
        finally:
            self.live.pop(session_id, None)
            self.by_sandbox.pop(live.sandbox_id, None)

    def _sandbox_stopping(self, sandbox_id: str, reason: EndReason) -> None:
        """A session's sandbox that ends for another reason (it crashed, a DELETE of the
        sandbox) ends the session."""
        sid = self.by_sandbox.get(sandbox_id)
        if sid is not None and reason is not EndReason.SESSION_ENDED:
            why = "out_of_credits" if reason is EndReason.OUT_OF_CREDITS else "sandbox_ended"
            self._in_background(self.end(sid, why))

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
        """Hot replace: the active sessions naming the bundle get its new values now."""
        self._changes[user_id] = self._changes.get(user_id, 0) + 1
        for live in list(self.live.values()):
            if live.user_id == user_id and name in live.secrets and not live.end_reason:
                await self._apply(live, name)

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
