"""Agents' tasks: one agent per sandbox, working on one task at a time (docs/agents.md).

A sandbox created with an agent gets an `AgentSession` here, in memory only: the user's key
lives in it (and, for a CLI, in the egress proxy's grant) and nowhere else, and both are dropped
when the sandbox stops. Each task is a row (state, result, counts) and a numbered event feed,
both kept after the sandbox is gone. A task ends as succeeded, failed, timed_out or cancelled;
then the sandbox is destroyed (end_reason task_finished, its workspace flushed first) unless
create asked to keep it for `keep_after_task_seconds`, in which case a follow-up task may come.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import aiohttp
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from e2a.agents import clis, keys
from e2a.agents.cli import CliAgent
from e2a.agents.egress import Egress, Grant
from e2a.agents.outcome import Outcome
from e2a.agents.ssrf import Policy
from e2a.ids import new_id
from e2a.sandboxes.host import NotRunning, SandboxHost, Unreachable
from e2a.sandboxes.records import aware, utcnow
from e2a.sandboxes.states import EndReason
from e2a.store.models import Sandbox, Task, TaskEvent

log = logging.getLogger("e2a.tasks")

LIVE_STATES = ("starting", "running")
# How often a held sandbox (a task running, or kept after one) is marked active.
HOLD_INTERVAL = 2.0
# Replicas (docs/kubernetes.md): how often a replica looks for cancels asked of its tasks through
# another, and for tasks of replicas that died; and a follower through another replica polls.
CANCEL_EVERY = 0.5
CANCEL_WAIT = 15.0
ORPHANS_EVERY = 5.0
REMOTE_POLL = 0.25
# Text deltas are stored in batches: one row per delta would be one write per token.
FLUSH_EVERY = 0.05
# One stdout or stderr line of a CLI, as stored.
MAX_LINE = 256 * 1024


class TaskConflict(Exception):
    """A task is already running, or the sandbox has no agent that can take one."""


class NoAgentHere(TaskConflict):
    """The sandbox's agent is not in this process (another replica's, or gone with one)."""


@dataclass
class AgentConfig:
    """What create said about the agent (its key included)."""

    agent: str                        # e2a | claude-code | codex | gemini-cli
    vendor: str
    key: str
    model: str | None = None
    base_url: str = ""                # the own agent's provider API root
    compatible: bool = False          # base_url is an OpenAI-compatible server of the caller's
    system_prompt: str | None = None
    tools: list[dict] = field(default_factory=list)
    max_steps: int = 50
    task_timeout: float | None = None
    keep_after: float = 0.0
    # held by a session (e2a/sessions): kept between tasks until the session ends it
    session: bool = False
    capabilities: tuple[str, ...] | None = None   # the own agent's tools (a session's)

    def __repr__(self) -> str:  # never the key, whatever logs a config
        return f"AgentConfig(agent={self.agent!r}, vendor={self.vendor!r}, model={self.model!r})"


@dataclass
class AgentSession:
    sandbox_id: str
    user_id: str
    template: str
    config: AgentConfig
    cli: CliAgent | None
    grant: Grant | None = None        # the egress proxy's, for a CLI
    address: str = ""                 # the sandbox's address, which the grant is under
    provider: Any = None              # the own agent's
    own_run: Any = None               # its run in progress (loop.OwnRun), if any
    retired_requests: int = 0         # requests of providers replaced by rekey()
    retired: list = field(default_factory=list)  # those, closed when the task ends
    # every key the agent has held (rekey), cut from its events and results (agents/keys.py)
    scrub: set[str] = field(default_factory=set)
    history: list = field(default_factory=list)  # the own agent's conversation
    task_id: str | None = None        # the latest task
    run: asyncio.Task | None = None
    tasks_done: int = 0
    ending: str | None = None         # the state a cancelled run ends in, and why
    ending_error: str | None = None
    keep_until: float | None = None
    gone: bool = False                # the sandbox is stopping
    next_seq: int = 1
    pending: list[TaskEvent] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    flushing: asyncio.Lock = field(default_factory=asyncio.Lock)
    flusher: asyncio.Task | None = None
    # a task runs: set before its run starts, cleared before the run's last notice (so a
    # follower woken by it sees the task over), not derived from `run`, which ends later
    running: bool = False


class Tasks:
    def __init__(self, sessions, host: SandboxHost, egress: Egress,
                 human_in_control: Callable[[str], bool] = lambda sid: False, *,
                 policy: Policy, own_url: str | None = None):
        self.sessions = sessions
        self.own_url = own_url  # where other replicas reach this one's API (None: nowhere)
        # what the own agent's provider clients may connect to (e2a/agents/ssrf.py)
        self.policy = policy
        self.human_in_control = human_in_control
        self.host = host
        self.egress = egress
        self.agents: dict[str, AgentSession] = {}
        self._hold: asyncio.Task | None = None
        self._replicas: asyncio.Task | None = None
        self._cancelling: set[str] = set()  # tasks whose cancel, asked elsewhere, is under way
        self._background: set[asyncio.Task] = set()
        host.on_stop(self._sandbox_stopping)

    # ---- lifetime ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.egress.start()
        await self._fail_orphans()
        self._hold = asyncio.create_task(self._hold_loop(), name="agent holds")
        if self.host.replica_key() is not None:
            self._replicas = asyncio.create_task(self._replicas_loop(), name="task replicas")

    async def stop(self) -> None:
        for loop in (self._hold, self._replicas):
            if loop:
                loop.cancel()
        stopping = []
        for s in list(self.agents.values()):
            if s.running:
                s.ending, s.ending_error = "failed", "e2a stopped while the task ran"
                stopping.append(self._stop_run(s))
        await asyncio.gather(*stopping, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.egress.stop()

    async def _fail_orphans(self) -> None:
        """Tasks whose e2a stopped while they ran cannot go on: the key was in its memory
        only (a CLI still running in its sandbox now gets 403 from the egress proxy). They
        fail, and their sandboxes end as if the task had. With one process: every task live
        at its start. With replicas: those of replicas that are gone (each replica looks)."""
        async with self.sessions() as db:
            rows = (await db.execute(select(Task).where(Task.state.in_(LIVE_STATES)))).scalars().all()
        ended, gone = [], {}
        for t in rows:
            if t.id in self._running_here():
                continue
            try:
                if t.replica not in gone:
                    gone[t.replica] = await self.host.replica_gone(t.replica)
                if gone[t.replica] and await self._fail_orphan(t):
                    ended.append(t.sandbox_id)
            except Exception as exc:  # the next pass tries again
                log.warning("failing orphaned task %s: %s", t.id, exc)
        for sandbox_id in ended:  # (a sandbox already gone is no error)
            self._in_background(self.host.destroy(sandbox_id, EndReason.SERVER_RESTART))

    def _running_here(self) -> set[str]:
        return {s.task_id for s in self.agents.values() if s.running and s.task_id}

    async def _fail_orphan(self, t: Task) -> bool:
        """The task failed, with its task_finished event; False if it was no longer live
        (another replica was first)."""
        error = ("e2a restarted while the task ran (the LLM key is held in memory only)"
                 if self.host.replica_key() is None else "the e2a replica running the task "
                 "stopped (the LLM key is held in its memory only)")
        now = utcnow()
        async with self.sessions() as db:
            done = await db.execute(update(Task).where(
                Task.id == t.id, Task.state.in_(LIVE_STATES)).values(
                    state="failed", ended_at=now, error=error))
            if done.rowcount == 0:
                return False
            last = (await db.execute(select(func.max(TaskEvent.seq)).where(
                TaskEvent.sandbox_id == t.sandbox_id))).scalar() or 0
            db.add(TaskEvent(sandbox_id=t.sandbox_id, seq=last + 1, task_id=t.id,
                             type="task_finished", at=now, data={
                                 "task_id": t.id, "state": "failed", "result": None,
                                 "error": error, "llm_requests": t.llm_requests,
                                 "input_tokens": t.input_tokens,
                                 "output_tokens": t.output_tokens}))
            await db.commit()
        return True

    async def _stamp_own(self) -> None:
        """The rows of this replica's agents and running tasks name its key now: one read
        just before the key changed (after a database blink) was written with the old one,
        after the change moved the rows, and would look a dead replica's."""
        mine, agents = self.host.replica_key(), list(self.agents)
        if mine is None or not agents:
            return
        async with self.sessions() as db:
            await db.execute(update(Sandbox).where(
                Sandbox.id.in_(agents), Sandbox.agent_replica != mine).values(
                    agent_replica=mine))
            running = list(self._running_here())
            if running:
                await db.execute(update(Task).where(
                    Task.id.in_(running), Task.replica != mine).values(replica=mine))
            await db.commit()

    async def _cancel_asked(self, sandbox_id: str, task_id: str, why: str) -> None:
        """One cancel at a time per task (the row keeps asking until the task has ended), and
        only of that task: a follow-up started meanwhile is not the one asked about."""
        self._cancelling.add(task_id)
        try:
            s = self.agents.get(sandbox_id)
            if s is not None and s.running and s.task_id == task_id:
                await self.cancel(sandbox_id, why)
        finally:
            self._cancelling.discard(task_id)

    async def _replicas_loop(self) -> None:
        """With replicas: carry out cancels asked of this replica's tasks through another, and
        fail the tasks of replicas that died."""
        orphans_at = time.monotonic() + ORPHANS_EVERY
        while True:
            await asyncio.sleep(CANCEL_EVERY)
            try:
                mine = self._running_here()
                if mine:
                    async with self.sessions() as db:
                        rows = (await db.execute(select(
                            Task.id, Task.sandbox_id, Task.state, Task.cancel_requested).where(
                                Task.id.in_(mine)))).all()
                    for task_id, sandbox_id, state, asked in rows:
                        if (asked or state not in LIVE_STATES) and task_id not in self._cancelling:
                            why = ("cancelled through the API" if state in LIVE_STATES else
                                   "ended by another replica (it found this one gone)")
                            self._in_background(self._cancel_asked(sandbox_id, task_id, why))
                if time.monotonic() >= orphans_at:
                    orphans_at = time.monotonic() + ORPHANS_EVERY
                    await self._stamp_own()
                    await self._fail_orphans()
            except Exception as exc:  # the database blinked: the next pass tries again
                log.warning("tasks of other replicas: %s", exc)

    # ---- agents and tasks --------------------------------------------------------------------

    async def attach(self, sandbox_id: str, user_id: str, template: str,
                     config: AgentConfig) -> AgentSession:
        """Give a new sandbox its agent (no task yet)."""
        cli = clis.get(config.agent)
        s = AgentSession(sandbox_id=sandbox_id, user_id=user_id, template=template,
                         config=config, cli=cli)
        s.scrub = _scrub_set(config.key)
        if cli is None:
            s.provider = self._provider(config)
        async with self.sessions() as db:
            last = (await db.execute(select(func.max(TaskEvent.seq)).where(
                TaskEvent.sandbox_id == sandbox_id))).scalar()
            if self.host.replica_key() is not None:  # where a first task through another goes
                await db.execute(update(Sandbox).where(Sandbox.id == sandbox_id).values(
                    agent_replica=self.host.replica_key(), agent_url=self.own_url))
                await db.commit()
        s.next_seq = (last or 0) + 1
        self.agents[sandbox_id] = s
        return s

    def _provider(self, config: AgentConfig):
        from e2a.agents.own import providers
        return providers.make(config.vendor, config.model, config.key, config.base_url,
                              policy=self.policy, compatible=config.compatible)

    def session(self, sandbox_id: str) -> AgentSession | None:
        return self.agents.get(sandbox_id)

    def rekey(self, sandbox_id: str, key: str, *, vendor: str, model: str | None,
              base_url: str, compatible: bool) -> None:
        """New LLM values for a sandbox's agent, without a restart (a session's secret bundle
        was replaced): the next request to the provider uses them, also mid-task. A request in
        flight finishes on the old ones."""
        s = self.agents.get(sandbox_id)
        if s is None or s.gone:
            return
        c = s.config
        c.key, c.model = key, model or c.model
        s.scrub |= _scrub_set(key)
        if s.cli is not None:  # a CLI's vendor is its own; the proxy's grant holds the key
            c.base_url = base_url
            if s.grant is not None:
                s.grant.key, s.grant.upstream = key, base_url or None
            return
        c.vendor, c.base_url, c.compatible = vendor, base_url, compatible
        old, s.provider = s.provider, self._provider(c)
        if s.own_run is not None:
            s.own_run.provider = s.provider
        if old is not None:
            s.retired_requests += old.requests
            s.retired.append(old)  # its request in flight, if any, finishes on it
            if not s.running:
                self._close_retired(s)

    def _close_retired(self, s: AgentSession) -> None:
        for provider in s.retired:
            self._in_background(provider.close())
        s.retired.clear()

    async def submit(self, sandbox_id: str, prompt: str, model: str | None = None,
                     timeout: float | None = None) -> Task:
        s = self.agents.get(sandbox_id)
        if s is None:
            raise NoAgentHere("this sandbox has no agent here (create it with `agent` and "
                               "`llm_key`; an agent's key is held by the e2a, or the replica, "
                               "that started it, and does not survive its restart)")
        if s.running:
            raise TaskConflict(f"task {s.task_id} is still running")
        if s.tasks_done and not (s.config.keep_after or s.config.session):
            raise TaskConflict("this sandbox ends with its task: create it with "
                               "keep_after_task_seconds for follow-ups")
        s.running = True  # before any await: two follow-ups at once must not both start
        model = model or s.config.model
        if s.provider is not None:
            if model:
                s.provider.model = model  # the own agent's follow-up may change the model
            model = s.provider.model      # recorded as used, the vendor's default included
        task = Task(id=new_id("tsk"), sandbox_id=sandbox_id, user_id=s.user_id,
                    agent=s.config.agent, vendor=s.config.vendor, model=model, prompt=prompt,
                    state="starting", started_at=utcnow(), llm_requests=0, input_tokens=0,
                    output_tokens=0, key_passed_in=False, replica=self.host.replica_key(),
                    replica_url=self.own_url if self.host.replica_key() is not None else None)
        try:
            async with self.sessions() as db:
                db.add(task)
                await db.commit()
        except BaseException:
            s.running = False
            raise
        s.task_id, s.keep_until, s.ending, s.ending_error = task.id, None, None, None
        follow_up = s.tasks_done > 0
        await self.emit(s, "task_started", {"task_id": task.id, "agent": s.config.agent,
                                            "model": model})
        s.run = asyncio.create_task(self._run(s, task.id, prompt, model, follow_up,
                                              timeout or s.config.task_timeout),
                                    name=f"task {task.id}")
        return task

    async def cancel(self, sandbox_id: str, why: str = "cancelled through the API") -> bool:
        """Cancel the running task; False if none runs. A task that runs on another replica is
        asked to stop through its row, and waited for (CANCEL_WAIT at most)."""
        s = self.agents.get(sandbox_id)
        if s is None or not s.running:
            return await self._cancel_elsewhere(sandbox_id)
        s.ending, s.ending_error = "cancelled", why
        await self._stop_run(s)
        return True

    async def _cancel_elsewhere(self, sandbox_id: str) -> bool:
        if self.host.replica_key() is None:
            return False
        t = await self.latest(sandbox_id)
        if t is None or t.state not in LIVE_STATES:
            return False
        async with self.sessions() as db:
            asked = await db.execute(update(Task).where(
                Task.id == t.id, Task.state.in_(LIVE_STATES)).values(cancel_requested=True))
            await db.commit()
        if asked.rowcount == 0:
            return False
        deadline = time.monotonic() + CANCEL_WAIT
        while time.monotonic() < deadline:
            await asyncio.sleep(REMOTE_POLL)
            async with self.sessions() as db:
                if await db.scalar(select(Task.state).where(Task.id == t.id)) not in LIVE_STATES:
                    return True
        return True  # asked: its replica ends it at its next look (or, if gone, its orphans' pass)

    async def _stop_run(self, s: AgentSession) -> None:
        """Cancel a running task's run and wait for its end. A run cancelled before it ran a
        line (a cancel right after the submit) never reached its own ending: it gets it here."""
        run = s.run
        run.cancel()
        await asyncio.wait([run])
        if s.running and s.run is run:
            await self._finish(s, s.task_id, s.ending or "cancelled",
                               s.ending_error or "cancelled", Outcome(), 0)

    async def agent_elsewhere(self, sandbox_id: str) -> tuple[str, int] | None:
        """(the API, the lock key) of the replica that holds the sandbox's agent (the sandbox's
        row names it from the agent's start; its latest task's, for a sandbox from before
        that), when it is another and runs at this moment: a replica's address is its own
        while it lives (a pod keeps its IP), and only then (a dead one's may be any pod's, a
        tenant's included)."""
        async with self.sessions() as db:
            named = (await db.execute(select(Sandbox.agent_replica, Sandbox.agent_url).where(
                Sandbox.id == sandbox_id))).one_or_none() or (None, None)
        t = await self.latest(sandbox_id)
        # (the task's too: a row stamped with a key its replica left just then names it)
        for key, url in (named, (t.replica, t.replica_url) if t is not None else (None, None)):
            if await self.other_replica(key, url):
                return url, key
        return None

    async def other_replica(self, key: int | None, url: str | None) -> bool:
        """A row's replica (its lock key and API) is another one, reachable, and alive at this
        moment: a replica's address is its own while it lives, and only then (a dead one's may
        be any pod's, a tenant's included), so nothing is passed to it otherwise."""
        return (key is not None and bool(url) and key != self.host.replica_key()
                and await self.host.replica_alive_now(key))

    def forwarded_to_me(self, key: str) -> bool:
        """A request another replica passed on (a follow-up, a session's WebSocket) is for
        this one (the key it named)."""
        own = self.host.replica_key()
        return own is not None and key == str(own)

    async def latest(self, sandbox_id: str) -> Task | None:
        async with self.sessions() as db:
            return (await db.execute(select(Task).where(Task.sandbox_id == sandbox_id)
                                     .order_by(Task.started_at.desc()).limit(1))).scalar()

    # ---- running -----------------------------------------------------------------------------

    async def _run(self, s: AgentSession, task_id: str, prompt: str, model: str | None,
                   follow_up: bool, timeout: float | None) -> None:
        """The task to its end. Whatever ends it (a cancel at any await included) ends in
        _finish; a run cancelled before it ran at all is finished by _stop_run."""
        outcome = Outcome()
        requests_before = self._requests(s)
        state, error = "failed", None
        try:
            if not await self._update(task_id, state="running"):
                # another replica ended it meanwhile (its end is recorded): nothing to run
                await self._finish(s, task_id, state, "ended elsewhere", outcome, 0)
                return
            work = (self._run_cli(s, prompt, model, follow_up, outcome) if s.cli
                    else self._run_own(s, prompt, outcome))
            await asyncio.wait_for(work, timeout)
            if outcome.succeeded:
                state = "succeeded"
            else:
                error = outcome.error or "the agent ended without a result"
        except asyncio.TimeoutError:
            state, error = "timed_out", f"the task ran past its timeout of {timeout:g} s"
        except asyncio.CancelledError:
            state, error = s.ending or "cancelled", s.ending_error or "cancelled"
        except (NotRunning, Unreachable) as exc:
            error = s.ending_error or f"the sandbox could not be reached: {exc}"
        except Exception as exc:  # a bug of ours must still end the task, with its reason
            log.exception("task %s failed", task_id)
            error = f"e2a failed running the agent: {type(exc).__name__}: {exc}"
        await self._finish(s, task_id, state, error, outcome, self._requests(s) - requests_before)

    async def _finish(self, s: AgentSession, task_id: str, state: str, error: str | None,
                      outcome: Outcome, requests: int) -> None:
        s.tasks_done += 1
        ended = {"state": state, "result": keys.scrub(outcome.result, s.scrub),
                 "error": keys.scrub(error, s.scrub), "llm_requests": requests,
                 "input_tokens": outcome.input_tokens, "output_tokens": outcome.output_tokens}
        # The row first, then the event and `running` together (no await between): a client
        # that reads task_finished finds the task over everywhere, and its next task is taken.
        # A row another replica ended already (its orphans' pass) has its task_finished.
        if await self._update(task_id, ended_at=utcnow(), **ended):
            await self.emit(s, "task_finished", {"task_id": task_id, **ended})
        s.running = False
        await self._flush(s)
        self._close_retired(s)
        async with s.changed:
            s.changed.notify_all()
        self._after_task(s)

    def _after_task(self, s: AgentSession) -> None:
        if s.gone:  # the sandbox is stopping already: the session goes with it
            self.agents.pop(s.sandbox_id, None)
            return
        if s.config.session:  # the session decides when its sandbox ends
            self.host.touch(s.sandbox_id)
            return
        if s.config.keep_after > 0:
            s.keep_until = time.monotonic() + s.config.keep_after
            self.host.touch(s.sandbox_id)
        else:
            self._in_background(self.host.destroy(s.sandbox_id, EndReason.TASK_FINISHED))

    def _requests(self, s: AgentSession) -> int:
        if s.grant is not None:
            return s.grant.requests
        return s.retired_requests + (s.provider.requests if s.provider is not None else 0)

    async def _run_cli(self, s: AgentSession, prompt: str, model: str | None, follow_up: bool,
                       outcome: Outcome) -> None:
        host_ip, sandbox_ip = self.host.addresses(s.sandbox_id)
        # The grant holds only while a task runs: between tasks the sandbox's code cannot spend
        # the key. The placeholder stays the same, for CLIs that keep their key in a config.
        if s.grant is None:
            # a session's own API root for the CLI's vendor (checked by the SSRF guard), if any
            s.grant = self.egress.grant(sandbox_ip, s.cli.vendor, s.config.key,
                                        upstream=s.config.base_url or None)
            s.address = sandbox_ip
        else:
            self.egress.allow(sandbox_ip, s.grant)
        launch = s.cli.launch(task=prompt, model=model,
                              base_url=self.egress.base_url(host_ip, s.cli.vendor),
                              placeholder=s.grant.placeholder, follow_up=follow_up)
        pid = None
        exit_code: int | None = None
        lines = {"stdout": _Lines(), "stderr": _Lines()}
        up = None
        try:
            up = await self.host.agent_request(s.sandbox_id, "POST", "/commands", json={
                "argv": launch.argv, "env": launch.env, "cwd": "/home/user", "user": "user"})
            if up.response.status != 200:
                body = (await up.response.read())[:2000].decode(errors="replace")
                raise RuntimeError(f"the agent's command did not start: {body}")
            async for frame in _frames(up.response):
                kind = frame.get("type")
                if kind == "start":
                    pid = frame.get("pid")
                elif kind in ("stdout", "stderr"):
                    for line in lines[kind].feed(frame.get("data", "")):
                        await self._cli_line(s, kind, line, outcome)
                elif kind == "exit":
                    exit_code = frame.get("exit_code")
                elif kind == "error":
                    raise Unreachable(frame.get("message", "the command's stream broke"))
            for kind, buf in lines.items():
                for line in buf.rest():
                    await self._cli_line(s, kind, line, outcome)
        except asyncio.CancelledError:
            if pid is not None:
                await asyncio.shield(self._kill(s.sandbox_id, pid))
            raise
        except (aiohttp.ClientError, ValueError) as exc:
            # The output stream broke (the sandbox is going, or envd's answer was cut): the
            # agent's events cannot be followed any more, so it is not left running blind.
            if pid is not None:
                await self._kill(s.sandbox_id, pid)
            raise Unreachable(f"lost the agent's output ({type(exc).__name__})") from exc
        finally:
            if up is not None:
                up.close()
            self.egress.revoke(sandbox_ip)
        if outcome.succeeded is None:
            outcome.succeeded = exit_code == 0 and outcome.error is None
        if not outcome.succeeded and outcome.error is None:
            outcome.error = f"{s.cli.name} exited with status {exit_code}"

    async def _cli_line(self, s: AgentSession, stream: str, line: str, outcome: Outcome) -> None:
        line = line[:MAX_LINE]
        if stream == "stdout" and line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                await self.emit(s, "cli", obj)
                s.cli.event(obj, outcome)
                return
        if line.strip():
            await self.emit(s, stream, {"text": line})

    async def _kill(self, sandbox_id: str, pid: int) -> None:
        try:
            up = await self.host.agent_request(sandbox_id, "POST", f"/commands/{pid}/signal",
                                               json={"signal": "SIGKILL"})
            up.close()
        except Exception:  # the sandbox is going: nothing left to kill
            pass

    async def _run_own(self, s: AgentSession, prompt: str, outcome: Outcome) -> None:
        from e2a.agents.own import loop

        # the desktop's size, if any, the computer tool asks envd itself (a create-time
        # resolution included)
        s.own_run = loop.OwnRun(
            sandbox_id=s.sandbox_id, template=s.template, host=self.host, provider=s.provider,
            task=prompt, emit=lambda kind, data: self.emit(s, kind, data),
            system_prompt=s.config.system_prompt, extra_tools=s.config.tools,
            max_steps=s.config.max_steps, history=s.history,
            human_in_control=self.human_in_control, outcome=outcome,
            capabilities=s.config.capabilities)
        try:
            result = await loop.run(s.own_run)
        finally:
            s.own_run = None
        if result.succeeded is None:
            outcome.succeeded = result.error is None

    # ---- the end of a sandbox ----------------------------------------------------------------

    def _sandbox_stopping(self, sandbox_id: str, reason: EndReason) -> None:
        """The key is forgotten at once; a running task ends, its last events still stored."""
        s = self.agents.get(sandbox_id)
        if s is None:
            return
        s.gone = True
        if s.grant is not None:
            self.egress.revoke(s.address)
        if s.provider is not None:
            self._in_background(s.provider.close())
        self._close_retired(s)
        s.config.key = ""
        if s.running:
            s.ending = "cancelled" if reason is EndReason.DELETED else "failed"
            s.ending_error = f"the sandbox ended ({reason.value}) while the task ran"
            self._in_background(self._stop_run(s))
        else:
            self.agents.pop(sandbox_id, None)

    async def _hold_loop(self) -> None:
        """Keep sandboxes whose agent works (or that are kept after a task) from idling out,
        and end kept ones when their time is up."""
        while True:
            await asyncio.sleep(HOLD_INTERVAL)
            now = time.monotonic()
            for s in list(self.agents.values()):
                if s.gone:
                    continue
                if s.running or s.config.session or (s.keep_until is not None
                                                     and now < s.keep_until):
                    self.host.touch(s.sandbox_id)
                elif s.keep_until is not None:
                    s.keep_until = None
                    self._in_background(self.host.destroy(s.sandbox_id, EndReason.TASK_FINISHED))

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- events ------------------------------------------------------------------------------

    async def emit(self, s: AgentSession, kind: str, data: dict) -> None:
        """Number and store one event; followers see it within FLUSH_EVERY."""
        # task_id "": an event of a session outside any task (e.g. an error of its secrets)
        s.pending.append(TaskEvent(sandbox_id=s.sandbox_id, seq=s.next_seq,
                                   task_id=s.task_id or "", type=kind,
                                   data=keys.scrub(data, s.scrub), at=utcnow()))
        s.next_seq += 1
        if s.flusher is None or s.flusher.done():
            s.flusher = asyncio.create_task(self._flush_soon(s))

    async def _flush_soon(self, s: AgentSession) -> None:
        await asyncio.sleep(FLUSH_EVERY)
        await self._flush(s)

    async def _flush(self, s: AgentSession) -> None:
        """Store what is pending. Under a lock: returning means that every event emitted before
        the call is stored, also one a concurrent flush took but had not committed yet."""
        async with s.flushing:
            while s.pending:
                # Taken off `pending` only once stored: a follower that finds no new row and
                # the task over must also find nothing pending, or it would stop one batch
                # short of task_finished (it stopped there while this commit was under way).
                batch = list(s.pending)
                try:
                    async with self.sessions() as db:
                        db.add_all(batch)
                        await db.commit()
                except IntegrityError:  # another replica ended the task, numbering its end
                    log.warning("events of %s not stored: its task was ended elsewhere",
                                s.sandbox_id)
                del s.pending[:len(batch)]
                async with s.changed:
                    s.changed.notify_all()

    async def events(self, sandbox_id: str, after: int, limit: int) -> list[TaskEvent]:
        async with self.sessions() as db:
            return list((await db.execute(
                select(TaskEvent).where(TaskEvent.sandbox_id == sandbox_id, TaskEvent.seq > after)
                .order_by(TaskEvent.seq).limit(limit))).scalars())

    async def follow(self, sandbox_id: str, after: int,
                     until: Callable[[], bool] | None = None) -> AsyncIterator[TaskEvent]:
        """Every event after `after`, as stored, then live until the sandbox's task is over
        (or, given `until`, until it says so: a session's feed goes on between tasks; wake()
        after it changes). The read and the wait for more happen under the same lock as a
        flush's notice, so a notice cannot slip between them."""
        while True:
            s = self.agents.get(sandbox_id)
            if s is None:
                # live is looked at before the read: what was stored before the task's end is
                # in this read, so an empty one after an end is really the last
                live = until is None and await self.live_elsewhere(sandbox_id)
                batch = await self.events(sandbox_id, after, 500)
                if not batch:
                    if not live:
                        return
                    await asyncio.sleep(REMOTE_POLL)
                    continue
            else:
                async with s.changed:
                    batch = await self.events(sandbox_id, after, 500)
                    if not batch:
                        if until() if until else not (s.running or s.pending):
                            return
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(s.changed.wait(), 15)
            for e in batch:
                yield e
                after = e.seq

    async def live_elsewhere(self, sandbox_id: str) -> bool:
        """With replicas: the sandbox's latest task runs on another replica, or has ended
        there but its task_finished event is not stored yet (the row is written first)."""
        if self.host.replica_key() is None or sandbox_id in self.agents:
            return False
        t = await self.latest(sandbox_id)
        if t is None:
            return False
        if t.state in LIVE_STATES:
            return True
        async with self.sessions() as db:
            finished = await db.scalar(select(func.count()).select_from(TaskEvent).where(
                TaskEvent.sandbox_id == sandbox_id, TaskEvent.task_id == t.id,
                TaskEvent.type == "task_finished"))
            now = aware(await db.scalar(select(func.now())))  # the database's clock
        # a replica that died between the two writes: not waited for past a few seconds
        return not finished and t.ended_at is not None and \
            (now - aware(t.ended_at)).total_seconds() < 5

    async def wake(self, sandbox_id: str) -> None:
        """Wake the sandbox's followers (to look at their `until` again)."""
        s = self.agents.get(sandbox_id)
        if s is not None:
            async with s.changed:
                s.changed.notify_all()

    async def _update(self, task_id: str, **values: Any) -> bool:
        """The live task's row updated; False if it is no longer live (with replicas, another
        failed it as an orphan: its end is recorded, and stays)."""
        async with self.sessions() as db:
            done = await db.execute(update(Task).where(
                Task.id == task_id, Task.state.in_(LIVE_STATES)).values(**values))
            await db.commit()
        return done.rowcount > 0


def _scrub_set(key: str) -> set[str]:
    return {key} if len(key) >= keys.SCRUB_FROM else set()


class _Lines:
    """Splits a stream's text chunks into lines."""

    def __init__(self) -> None:
        self.buf = ""

    def feed(self, data: str) -> list[str]:
        self.buf += data
        *lines, self.buf = self.buf.split("\n")
        if len(self.buf) > MAX_LINE:  # a line without end: stored in pieces
            lines.append(self.buf)
            self.buf = ""
        return lines

    def rest(self) -> list[str]:
        rest, self.buf = self.buf, ""
        return [rest] if rest else []


async def _frames(response) -> AsyncIterator[dict]:
    """envd's NDJSON command stream, one object at a time (lines may be long: no readline limit)."""
    buf = b""
    async for chunk in response.content.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)
    if buf.strip():
        yield json.loads(buf)

