"""The in-process sandbox host: creates sandboxes (cold or from the warm pool), destroys them,
notices their death, reaps idle and expired ones, and reconciles with the host after a restart.

Every sandbox is a list of resource units (resources.py) and a state (states.py). One path
removes a sandbox, `_stop`, whatever the cause (failed create, DELETE, death, timeout,
reconcile): it tears the units down in reverse order and only then frees the sandbox's network
slot and capacity. Each sandbox has a lock; its boot holds it, so a DELETE during boot cancels
the boot and ends `destroyed`, never `running`. Every transition is written with its event
(records.py) before it counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp
import websockets
from yarl import URL

from e2a.config import Settings
from e2a.ids import new_id
from e2a.network import links
from e2a.network.firewall import Firewall, host_nameservers
from e2a.runtime import cgroups, quota
from e2a.runtime.runsc import Runsc
from e2a.sandboxes import envd, resources, states
from e2a.sandboxes.agent_keys import AgentKeys
from e2a.sandboxes.host import (Conflict, CreateFailed, CreateSpec, DeletedDuringCreate,
                                NoCapacity, NotRunning, SandboxHost, SandboxRecord,
                                TooManyConnections, Unavailable, Unreachable, Upstream,
                                UserLimit)
from e2a.sandboxes.hostlog import HostLog
from e2a.sandboxes.records import Records, StoreCatalog, aware, utcnow
from e2a.sandboxes.states import EndReason, State
from e2a.sandboxes.watch import DeathWatch, runsc_processes
from e2a.store.models import Sandbox
from e2a.templates import builder, recipes
from e2a.workspaces.service import MountPlan, WorkspaceBusy, Workspaces

log = logging.getLogger("e2a.sandboxes")
T = TypeVar("T")

POOL_LIFETIME = 7200  # a warm sandbox's own limits until a user claims it
# Open connections into one sandbox (command streams, file transfers, PTYs, proxied requests):
# one more is refused with 429 rather than queued behind the others.
MAX_CONNECTIONS_PER_SANDBOX = 128
# The port proxy gives up on an app that accepts but does not answer: connect, and the gap
# between two reads of its answer (headers or body).
PORT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
AGENT = "the sandbox's agent"
OOM_RECENT = 5.0  # seconds: see LiveSandbox.oom_rose_at
# WebSocket messages from a sandbox (PTY output, a proxied app): at most 4 MiB each and 2
# waiting, so a client that stops reading makes the server hold a few MiB, not hundreds.
WS_MAX_MESSAGE = 4 * 1024 * 1024
SECRET_LENGTH = 8  # of a template's per-sandbox secrets: VNC's authentication uses 8 characters
# Failures that may mean the sandbox is gone: it refused, dropped or never answered the link.
SANDBOX_SIDE_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                       aiohttp.ServerTimeoutError, asyncio.TimeoutError, ConnectionResetError)


class StartupError(Exception):
    """e2a cannot tell what runs on this host; starting anyway could destroy live sandboxes."""


@dataclass
class LiveSandbox:
    """A sandbox this process runs (or is creating or removing)."""

    plan: resources.Plan
    units: list[resources.Resource]
    user_id: str | None
    template: str
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    cpu_quota_us: int
    metadata: dict[str, str]
    idle_timeout: int
    max_lifetime: int
    created_at: datetime
    expires_at: datetime
    state: State = State.CREATING
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set when it starts stopping
    last_activity: float = field(default_factory=time.monotonic)
    inflight: int = 0                       # requests into it awaiting their answer
    upstreams: set[Upstream] = field(default_factory=set)
    end_reason: EndReason | None = None
    boot_task: asyncio.Task | None = None
    # The host OOM killer's count in the sandbox's cgroup as last seen, and when it last rose.
    # It also counts kills of single processes inside (the sandbox lives on), so a death is
    # `out_of_memory` if the count rose since, or within OOM_RECENT seconds before: a Sentry
    # can fall over a moment after the OOM killer took one of its stubs.
    oom_kills_seen: int = 0
    oom_rose_at: float = float("-inf")
    probing: bool = False

    @property
    def id(self) -> str:
        return self.plan.id

    @property
    def link(self) -> links.Link:
        return self.plan.link

    @property
    def in_use(self) -> bool:
        return self.inflight > 0 or bool(self.upstreams)

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def record(self, node: str) -> SandboxRecord:
        return SandboxRecord(
            id=self.id, user_id=self.user_id, node=node, template=self.template,
            state=self.state.value, vcpu=self.vcpu, cpu_fraction=self.cpu_fraction,
            memory_mib=self.memory_mib, internet=self.plan.internet, metadata=self.metadata,
            idle_timeout_seconds=self.idle_timeout, max_lifetime_seconds=self.max_lifetime,
            created_at=self.created_at, expires_at=self.expires_at,
            end_reason=self.end_reason.value if self.end_reason else None,
            workspace_id=self.workspace_id)

    @property
    def workspace_id(self) -> str | None:
        return self.plan.workspace.workspace_id if self.plan.workspace else None


async def retry(what: str, fn: Callable[[], Awaitable[T]], attempts: int = 3,
                pause: float = 1.0) -> T:
    """Reconcile's questions: asked again on failure; a last failure stops e2a from starting."""
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except Exception as exc:
            if attempt == attempts:
                raise StartupError(
                    f"cannot {what} ({exc}); e2a will not start without knowing what runs on "
                    "this host, so that no live sandbox is destroyed by mistake") from exc
            log.warning("cannot %s (attempt %d of %d): %s", what, attempt, attempts, exc)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")


class Manager(SandboxHost):
    def __init__(self, settings: Settings, sessions,
                 kinds: tuple[type[resources.Resource], ...] = resources.KINDS):
        self.settings = settings
        self.kinds = kinds  # the resource units of a sandbox (tests pass fakes)
        self.node = socket.gethostname()
        self.runsc = Runsc(settings.runsc, settings.run_dir / "runsc")
        self.env = resources.HostEnv(
            instance=settings.instance, sandboxes_dir=settings.data_dir / "sandboxes",
            runsc=self.runsc, firewall=Firewall(settings.instance, settings.subnet, settings.egress_port),
            addressing=links.Addressing(settings.instance, settings.subnet),
            envd_binary=Path(settings.envd), resolv_conf=settings.run_dir / "resolv.conf")
        self.workspaces = Workspaces(settings, sessions)
        self.env.rclone, self.env.workspaces = settings.rclone, self.workspaces
        self.records = Records(sessions)
        self.keys = AgentKeys(settings.data_dir / "agent.key")
        self.catalog = StoreCatalog(self.records, self._live_record, self.node)
        self.hostlog = HostLog(settings.data_dir / "logs")
        self.http = envd.make_client()
        # Health checks have a client of their own, so they never wait behind a tenant's streams.
        self.probe_http = envd.make_client()
        self.sandboxes: dict[str, LiveSandbox] = {}
        self._creating: dict[str, int] = {}  # creates under way, per user
        self.slots: dict[int, str] = {}
        self.pool: dict[str, list[str]] = {}  # template -> ready sandbox ids, oldest first
        self.stuck: set[str] = set()          # teardown failed: retried by the reaper
        self.retrying: set[str] = set()       # of those, the ones being retried now
        self.retry_at: dict[str, tuple[float, float]] = {}  # id -> (next try, pause), backing off
        self.watch = DeathWatch(self._on_death)
        self._pool_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._stop_listeners: list[Callable[[str, EndReason], None]] = []

    # ---- startup and shutdown -------------------------------------------------------------

    async def start(self) -> None:
        self._private_dirs()
        self.env.resolv_conf.write_text(
            "".join(f"nameserver {ns}\n" for ns in host_nameservers()))
        await resources.prepare(self.env, self.kinds, self.settings)  # the disk pool
        # Before reconcile: a mount found dead there uploads what it left to S3.
        await self.workspaces.start()
        await self.reconcile()
        self._tasks.append(asyncio.create_task(self._reaper(), name="reaper"))
        self._tasks.append(asyncio.create_task(self._death_sweeper(), name="death sweep"))
        if any(self._pool_target(name) for name in recipes.available()):
            self._tasks.append(asyncio.create_task(self._pool_filler(), name="pool"))

    async def stop(self) -> None:
        """Stop background work; sandboxes keep running and are adopted at the next start."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for sb in self.sandboxes.values():
            if sb.boot_task and not sb.boot_task.done():
                sb.boot_task.cancel()
        boots = [sb.boot_task for sb in self.sandboxes.values() if sb.boot_task]
        await asyncio.gather(*boots, return_exceptions=True)
        self.watch.close()
        await self.workspaces.stop(mounts_left=any(
            sb.plan.workspace for sb in self.sandboxes.values()))
        await self.http.close()
        await self.probe_http.close()

    def _private_dirs(self) -> None:
        """Only root may read what e2a keeps: the database (key hashes, sandboxes), logs, the
        agent key, runsc's state (sandbox specs), each sandbox's files on the host and the
        template images."""
        data, run = self.settings.data_dir, self.settings.run_dir
        for d in (data, run, run / "runsc", self.env.sandboxes_dir, data / "logs"):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        for f in data.glob("e2a.db*"):
            os.chmod(f, 0o600)
        builder.private_cache(self.settings.cache_dir)  # the template images

    def check_runtime(self, recipe: recipes.Recipe) -> Path:
        if not self.runsc.available():
            raise Unavailable(f"runsc not found at {self.settings.runsc} (run `make build`)")
        if not Path(self.settings.envd).is_file():
            raise Unavailable(f"envd not found at {self.settings.envd} (run `make build`)")
        if not builder.is_built(self.settings.cache_dir, recipe):
            raise Unavailable(f"template {recipe.name!r} is not built (run `make templates`)")
        return builder.rootfs_path(self.settings.cache_dir, recipe)

    def _cgroup(self, sb: LiveSandbox) -> cgroups.Cgroup:
        return cgroups.Cgroup(self.settings.instance, sb.plan.runtime_id)

    # ---- the catalog's view of live sandboxes ----------------------------------------------

    def _live_record(self, sandbox_id: str) -> SandboxRecord | None:
        sb = self.sandboxes.get(sandbox_id)
        return sb.record(self.node) if sb is not None else None

    def list(self) -> list[str]:
        return list(self.sandboxes)

    def pool_sizes(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.pool.items()}

    def workspace_mounted(self, workspace_id: str) -> bool:
        return self.workspaces.leased(workspace_id)

    # ---- state -----------------------------------------------------------------------------

    async def _move(self, sb: LiveSandbox, new: State, reason: str | None = None,
                    detail: str | None = None, **values: Any) -> None:
        """The one way a sandbox changes state: checked, written with its event, then true."""
        states.check(sb.id, sb.state, new)
        await self.records.transition(sb.id, sb.state, new, reason, detail, **values)
        sb.state = new

    # ---- create ----------------------------------------------------------------------------

    async def create(self, spec: CreateSpec) -> SandboxRecord:
        recipe = recipes.load(spec.template)
        if recipe is None:
            raise Unavailable(f"template {spec.template!r} is not available")
        self._count_in(spec.user_id)  # no await before: concurrent creates cannot both pass
        try:
            if spec.workspace is None:  # a workspace is bound at boot: no pooled sandbox has it
                claimed = await self._claim_from_pool(recipe, spec)
                if claimed is not None:
                    return claimed
            sb = await self._launch(recipe, spec)
            return sb.record(self.node)
        finally:
            self._creating[spec.user_id] -= 1
            if not self._creating[spec.user_id]:
                del self._creating[spec.user_id]

    def _count_in(self, user_id: str) -> None:
        """Count a create of the user's, or refuse it past E2A_MAX_SANDBOXES_PER_USER. Creates
        under way count (their sandbox may not be in self.sandboxes yet), so a create is
        counted twice for its own duration: never too few."""
        cap = self.settings.max_sandboxes_per_user
        held = sum(1 for sb in self.sandboxes.values() if sb.user_id == user_id)
        if cap and held + self._creating.get(user_id, 0) >= cap:
            raise UserLimit(f"a user may have at most {cap} sandboxes at once (sessions' "
                            "included); end one first")
        self._creating[user_id] = self._creating.get(user_id, 0) + 1

    def _reserve(self, recipe: recipes.Recipe, spec: CreateSpec, image: Path,
                 workspace: MountPlan | None = None) -> LiveSandbox:
        """Take capacity and a network slot, with no await between the check and the taking:
        concurrent creates can never pass the check together. Warm sandboxes count too."""
        if len(self.sandboxes) >= self.settings.max_sandboxes:
            raise NoCapacity(f"this host runs its maximum of {self.settings.max_sandboxes} "
                             "sandboxes")
        slot = next((s for s in range(self.env.addressing.slots) if s not in self.slots), None)
        if slot is None:
            raise NoCapacity("no free network slot")
        now = utcnow()
        sid = new_id("sbx")
        plan = resources.Plan(
            id=sid, slot=slot, internet=spec.internet, token=self.keys.token(sid), image=image,
            memory_mib=recipe.memory_mib, disk_mib=recipe.disk_mib,
            platform=self.settings.platform or recipe.platform, workspace=workspace,
            env=sandbox_env(recipe, {**spec.params, **{
                name: self.keys.secret(name, sid, SECRET_LENGTH)
                for name in recipe.secrets}})).bind(self.env)
        sb = LiveSandbox(
            plan=plan, units=resources.units_for(self.env, plan, self.kinds), user_id=spec.user_id,
            template=recipe.name, vcpu=recipe.vcpu, cpu_fraction=recipe.cpu_fraction,
            memory_mib=recipe.memory_mib, cpu_quota_us=recipe.cpu_quota_us,
            metadata=spec.metadata, idle_timeout=spec.idle_timeout,
            max_lifetime=spec.max_lifetime, created_at=now,
            expires_at=now + timedelta(seconds=spec.max_lifetime))
        self.sandboxes[plan.id] = sb
        self.slots[slot] = plan.id
        return sb

    def _release(self, sb: LiveSandbox) -> None:
        """Give back capacity and the slot: only once nothing of the sandbox is on the host."""
        self.sandboxes.pop(sb.id, None)
        if self.slots.get(sb.plan.slot) == sb.id:
            del self.slots[sb.plan.slot]

    async def _launch(self, recipe: recipes.Recipe, spec: CreateSpec) -> LiveSandbox:
        image = self.check_runtime(recipe)
        workspace = None
        if spec.workspace is not None:
            workspace = await self._plan_workspace(spec)
        try:
            sb = self._reserve(recipe, spec, image, workspace)
        except BaseException:
            if workspace is not None:
                self.workspaces.release(workspace)
            raise
        row = Sandbox(
            id=sb.id, user_id=spec.user_id, template=recipe.name, state=State.CREATING.value,
            vcpu=recipe.vcpu, cpu_fraction=recipe.cpu_fraction, memory_mib=recipe.memory_mib,
            internet=spec.internet, metadata_=spec.metadata, env_vars=spec.env_vars,
            idle_timeout_seconds=spec.idle_timeout, max_lifetime_seconds=spec.max_lifetime,
            slot=sb.plan.slot, envd_token="", created_at=sb.created_at,
            expires_at=sb.expires_at, workspace_id=sb.workspace_id)
        try:
            await self.records.insert(row, "create" if spec.user_id else "warm_pool")
        except BaseException:
            self._release(sb)
            if workspace is not None:
                self.workspaces.release(workspace)
            raise
        sb.boot_task = asyncio.create_task(self._boot(sb, spec.env_vars), name=f"boot {sb.id}")
        try:
            await asyncio.shield(sb.boot_task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if sb.boot_task.cancelled() and not (me and me.cancelling()):
                raise DeletedDuringCreate(f"sandbox {sb.id} was deleted while it was being "
                                          "created") from None
            raise
        except (NoCapacity, Unavailable):
            raise
        except Exception as exc:
            raise CreateFailed(f"sandbox {sb.id} could not start: {exc}") from exc
        return sb

    async def _plan_workspace(self, spec: CreateSpec) -> MountPlan:
        """Find (or make) the scope's workspace, size its mount and lease it (so that it cannot
        be deleted under the create): the lease goes with the sandbox, released once it is
        gone (`_stop`)."""
        if not Path(self.settings.rclone).is_file():
            raise Unavailable(f"rclone not found at {self.settings.rclone} (run `make build`)")
        try:
            return await self.workspaces.plan(spec.workspace)
        except WorkspaceBusy as exc:
            raise Conflict(str(exc)) from exc
        except Exception as exc:
            raise Unavailable(f"the workspace store did not answer: {exc}") from exc

    async def _boot(self, sb: LiveSandbox, env_vars: dict[str, str]) -> None:
        """Make every unit, wait for the agent, start watching; on any failure or cancellation,
        `_stop` removes everything (the undo of a create is a destroy)."""
        t0 = time.perf_counter()
        marks: list[tuple[str, float]] = [("", t0)]

        def mark(step: str) -> None:
            marks.append((step, time.perf_counter()))

        async with sb.lock:
            try:
                self.hostlog.write(sb.id, f"creating from template {sb.template}")
                await self._move(sb, State.CONFIGURING)
                *prepare, container = sb.units
                for unit in prepare:
                    await unit.create()
                mark("network+rootfs")
                await self._move(sb, State.BOOTING)
                await container.create()
                mark("runsc")
                await self._agent_up(sb, env_vars)
                mark("envd")
                await self._move(sb, State.RUNNING, "booted",
                                 f"{1000 * (time.perf_counter() - t0):.0f} ms")
                steps = ", ".join(f"{step} {1000 * (at - prev):.0f}"
                                  for (_, prev), (step, at) in zip(marks, marks[1:]))
                self.hostlog.write(sb.id, f"running (ip {sb.link.sandbox_ip}, platform "
                                          f"{sb.plan.platform}; boot {steps} ms)")
            except BaseException as exc:
                reason = sb.end_reason or EndReason.CREATE_FAILED
                detail = "deleted during create" if isinstance(exc, asyncio.CancelledError) \
                    else f"create failed: {exc}"
                if not isinstance(exc, asyncio.CancelledError):
                    log.warning("create %s failed: %s", sb.id, exc)
                # Hold the lock until the teardown is done, however often we are cancelled:
                # a DELETE waiting for the lock must find the sandbox destroyed, not half-torn.
                await resources.uninterrupted(self._stop(sb, reason, detail))
                raise

    async def _agent_up(self, sb: LiveSandbox, env_vars: dict[str, str]) -> None:
        """The sandbox is started: wait for its agent and its template's services, apply the
        CPU quota, watch its processes."""
        await envd.wait_ready(self.http, sb.link.sandbox_ip, sb.plan.token)
        recipe = recipes.load(sb.template)
        if recipe is not None and recipe.services:
            await envd.wait_services(self.http, sb.link.sandbox_ip, sb.plan.token,
                                     recipe.ready_timeout)
        cgroup = self._cgroup(sb)
        # The CPU quota starts now: boot work is e2a's, and it is CPU-bound.
        cgroup.set_cpu_quota(sb.cpu_quota_us)
        sb.oom_kills_seen = _oom_kills(cgroup)
        if not self.watch.watch(sb.id, runsc_processes(cgroup.procs())):
            raise RuntimeError("a runsc process exited during boot")
        if env_vars:
            await self._init_env(sb, env_vars)

    async def _init_env(self, sb: LiveSandbox, env_vars: dict[str, str]) -> None:
        async with envd.request(self.http, sb.link.sandbox_ip, sb.plan.token, "POST", "/init",
                                json={"env": env_vars}, timeout=10) as r:
            r.raise_for_status()

    # ---- warm pool -------------------------------------------------------------------------

    async def _claim_from_pool(self, recipe: recipes.Recipe,
                               spec: CreateSpec) -> SandboxRecord | None:
        ready = self.pool.get(recipe.name)
        if spec.params and any(recipe.params.get(k) != v for k, v in spec.params.items()):
            return None  # pooled sandboxes run the template's defaults
        while ready:
            sid = ready.pop(0)
            self._pool_wakeup.set()
            sb = self.sandboxes.get(sid)
            if sb is None:
                continue
            async with sb.lock:
                if sb.state is not State.RUNNING or sb.user_id is not None:
                    continue
                try:
                    if not spec.internet:
                        await self.env.firewall.set_internet(sb.link.host_if, False)
                        sb.plan.internet = False
                    if spec.env_vars:
                        await self._init_env(sb, spec.env_vars)
                except Exception as exc:
                    log.warning("warm sandbox %s unusable: %s", sid, exc)
                    await self._stop(sb, EndReason.CRASHED, f"warm pool claim failed: {exc}")
                    continue
                now = utcnow()
                sb.user_id, sb.metadata = spec.user_id, spec.metadata
                sb.idle_timeout, sb.max_lifetime = spec.idle_timeout, spec.max_lifetime
                sb.created_at, sb.expires_at = now, now + timedelta(seconds=spec.max_lifetime)
                sb.touch()
                await self.records.claim(
                    sid, spec.user_id, spec.metadata, internet=spec.internet,
                    env_vars=spec.env_vars, idle_timeout_seconds=spec.idle_timeout,
                    max_lifetime_seconds=spec.max_lifetime, created_at=sb.created_at,
                    expires_at=sb.expires_at)
                self.hostlog.write(sid, f"handed out from the warm pool to {spec.user_id}")
                return sb.record(self.node)
        return None

    async def _pool_filler(self) -> None:
        """Keep each built template's pool of sandboxes started and waiting."""
        while True:
            try:
                for name in recipes.available():
                    recipe = recipes.load(name)
                    if recipe is None or not builder.is_built(self.settings.cache_dir, recipe):
                        continue
                    ready = self.pool.setdefault(name, [])
                    while (len(ready) < self._pool_target(name)
                           and len(self.sandboxes) < self.settings.max_sandboxes):
                        sb = await self._launch(recipe, CreateSpec(
                            user_id=None, template=name, idle_timeout=POOL_LIFETIME,
                            max_lifetime=POOL_LIFETIME))
                        try:
                            await self._prewarm(sb)
                        except Exception as exc:  # never left running outside the pool
                            await self.destroy(sb.id, EndReason.CRASHED,
                                               f"warm-up of a pooled sandbox failed: {exc}")
                            raise
                        if sb.state is State.RUNNING:
                            ready.append(sb.id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("warm pool refill failed: %s", exc)
                await asyncio.sleep(5)
            self._pool_wakeup.clear()
            try:
                await asyncio.wait_for(self._pool_wakeup.wait(), 5)
            except asyncio.TimeoutError:
                pass

    def _pool_target(self, template: str) -> int:
        recipe = recipes.load(template)
        return self.settings.pool_size_of(template, recipe.pool_size) if recipe else 0

    async def _prewarm(self, sb: LiveSandbox) -> None:
        """Run the shell once, so the user's first command finds bash and its libraries
        already loaded in the sandbox's page cache (about 10 ms off the first command); then
        wait until the sandbox is quiet: a service is ready when its port opens, but Chromium
        then works for another ~2.5 s of CPU, which the first user of a pooled browser would
        otherwise wait out."""
        async with envd.request(self.http, sb.link.sandbox_ip, sb.plan.token, "POST",
                                "/commands", json={"cmd": "true"}, timeout=30) as r:
            await r.read()
        recipe = recipes.load(sb.template)
        if recipe is not None and recipe.services:
            await self._settle(sb)

    async def _settle(self, sb: LiveSandbox, window: float = 0.25, busy: float = 0.1,
                      limit: float = 15.0) -> None:
        """Until the sandbox used less than `busy` of a CPU over `window` seconds (at most
        `limit` seconds)."""
        cgroup = self._cgroup(sb)
        deadline = time.monotonic() + limit
        try:
            used = cgroup.cpu_used_us()
            while time.monotonic() < deadline:
                await asyncio.sleep(window)
                now = cgroup.cpu_used_us()
                if now - used < busy * window * 1e6:
                    return
                used = now
        except (OSError, ValueError):
            return  # no CPU accounting here: nothing to wait for

    # ---- destroy ---------------------------------------------------------------------------

    async def destroy(self, sandbox_id: str, reason: EndReason, detail: str | None = None) -> None:
        """Remove a sandbox; returns once it is destroyed (or, if a step failed, left in
        `stopping` for the reaper to finish). Safe to call concurrently and repeatedly."""
        sb = self.sandboxes.get(sandbox_id)
        if sb is None:
            return
        boot = sb.boot_task
        if boot is not None and not boot.done() and boot is not asyncio.current_task():
            if sb.end_reason is None:  # the first to stop a boot cancels it; the others wait
                sb.end_reason = reason
                boot.cancel()  # its own failure path stops the sandbox, holding the lock
            await asyncio.wait([boot])
        async with sb.lock:
            await self._stop(sb, reason, detail)

    async def _stop(self, sb: LiveSandbox, reason: EndReason, detail: str | None = None) -> None:
        """The one teardown path. The caller holds `sb.lock`."""
        if sb.state is State.DESTROYED:
            return
        sb.end_reason = sb.end_reason or reason
        reason = sb.end_reason
        detail = detail or reason.value
        if sb.state is not State.STOPPING:
            sb.gone.set()
            try:
                await self._move(sb, State.STOPPING, reason.value, detail,
                                 end_reason=reason.value)
            except Exception as exc:
                log.error("recording %s stopping failed: %s", sb.id, exc)
                sb.state = State.STOPPING
            self.hostlog.write(sb.id, f"stopping: {detail}")
            for listener in self._stop_listeners:
                listener(sb.id, reason)
        self.watch.unwatch(sb.id)
        for ready in self.pool.values():
            if sb.id in ready:
                ready.remove(sb.id)
        await asyncio.gather(*(up.abort(reason) for up in list(sb.upstreams)),
                             return_exceptions=True)
        failed = await resources.teardown(sb.units)
        if failed:
            self.stuck.add(sb.id)
            self.hostlog.write(sb.id, f"teardown incomplete, retrying: {'; '.join(failed)}")
            return
        self.stuck.discard(sb.id)
        self.retry_at.pop(sb.id, None)
        self._release(sb)
        if sb.plan.workspace:  # counted again now that all is in S3; its lease ends after that
            self._in_background(self.workspaces.ended(sb.plan.workspace))
        try:
            await self._move(sb, State.DESTROYED, reason.value, detail, destroyed_at=utcnow(),
                             end_reason=reason.value, host_reason=detail[:200])
        except Exception as exc:  # nothing is left on the host; the row is fixed at next start
            log.error("recording %s destroyed failed: %s", sb.id, exc)
            sb.state = State.DESTROYED
        self.hostlog.write(sb.id, f"destroyed: {detail}")

    # ---- death -----------------------------------------------------------------------------

    def _on_death(self, sandbox_id: str, pid: int) -> None:
        self._in_background(self._died(sandbox_id, pid))

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _died(self, sandbox_id: str, pid: int) -> None:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.state is not State.RUNNING:
            return
        oom = (_oom_kills(self._cgroup(sb)) > sb.oom_kills_seen
               or time.monotonic() - sb.oom_rose_at < OOM_RECENT)
        reason = EndReason.OUT_OF_MEMORY if oom else EndReason.CRASHED
        detail = (f"the host killed the sandbox for memory (runsc process {pid} died)" if oom
                  else f"runsc process {pid} of the sandbox exited")
        log.warning("sandbox %s died: %s", sandbox_id, detail)
        await self.destroy(sandbox_id, reason, detail)

    async def _agent_answers(self, sb: LiveSandbox, attempts: int, timeout: float) -> bool:
        for _ in range(attempts):
            try:
                async with envd.request(self.probe_http, sb.link.sandbox_ip, sb.plan.token,
                                        "GET", "/health", timeout=timeout) as r:
                    if r.status == 200:
                        return True
            except envd.TRANSPORT_ERRORS:
                pass
        return False

    async def _probe(self, sb: LiveSandbox, attempts: int, timeout: float, why: str) -> None:
        """Ask the agent; if it does not answer, the sandbox is dead whatever its processes say."""
        if sb.state is State.RUNNING and not await self._agent_answers(sb, attempts, timeout):
            if sb.state is State.RUNNING:
                await self.destroy(sb.id, EndReason.CRASHED,
                                   f"the sandbox's agent stopped answering ({why})")

    def _probe_later(self, sb: LiveSandbox, attempts: int, timeout: float, why: str) -> None:
        if sb.probing:
            return
        sb.probing = True

        async def run() -> None:
            try:
                await self._probe(sb, attempts, timeout, why)
            finally:
                sb.probing = False
        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _sweep_once(self) -> None:
        mounts = None  # the mount table, read once per sweep if any sandbox has a workspace
        for sb in list(self.sandboxes.values()):
            if sb.state is not State.RUNNING or not self.watch.watching(sb.id):
                continue  # not up yet, or its death is being handled
            cgroup = self._cgroup(sb)
            kills = _oom_kills(cgroup)
            if kills != sb.oom_kills_seen:
                sb.oom_kills_seen, sb.oom_rose_at = kills, time.monotonic()
            if not set(cgroup.procs()) - self.watch.pids(sb.id):
                self._probe_later(sb, 1, 1.0, "no systrap stub process left")
            elif sb.workspace_id:
                mounts = quota.mount_table() if mounts is None else mounts
                if not self._workspace_alive(sb, mounts):
                    self._in_background(self.destroy(
                        sb.id, EndReason.CRASHED, "the workspace mount on /home/user exited"))

    async def _death_sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.death_check_interval)
            try:
                self._sweep_once()
            except Exception as exc:
                log.error("death sweep: %s", exc)

    def _workspace_alive(self, sb: LiveSandbox, mounts: dict[str, str] | None = None) -> bool:
        return resources.WorkspaceMount.mount(self.env, sb.plan.dir,
                                              sb.workspace_id).alive(mounts)

    # ---- idle, lifetime, retries -----------------------------------------------------------

    def on_stop(self, listener: Callable[[str, EndReason], None]) -> None:
        self._stop_listeners.append(listener)

    def addresses(self, sandbox_id: str) -> tuple[str, str]:
        sb = self._running(sandbox_id)
        return sb.link.host_ip, sb.link.sandbox_ip

    def touch(self, sandbox_id: str) -> None:
        sb = self.sandboxes.get(sandbox_id)
        if sb is not None:
            sb.touch()

    async def _running_commands(self, sb: LiveSandbox) -> int:
        data = await envd.get_json(self.http, envd.base_url(sb.link.sandbox_ip) + "/commands",
                                   sb.plan.token)
        return len(data.get("commands", [])) if data else 0

    async def _reap_once(self) -> None:
        now_wall, now = utcnow(), time.monotonic()
        for sb in list(self.sandboxes.values()):
            if sb.id in self.stuck:
                # In the background: a teardown that waits (a workspace that cannot upload
                # yet) must not hold up the other sandboxes' timeouts. Backing off to a try a
                # minute: one that keeps failing (S3 down for long) costs little.
                at, pause = self.retry_at.get(sb.id, (0.0, 0.5))
                if sb.id not in self.retrying and now >= at:
                    self.retrying.add(sb.id)
                    self.retry_at[sb.id] = (now + pause, min(60.0, pause * 2))
                    self._in_background(self._retry_stop(sb))
                continue
            if sb.state is not State.RUNNING or sb.user_id is None:
                continue
            if now_wall >= sb.expires_at:
                await self.destroy(sb.id, EndReason.MAX_LIFETIME)
            elif not sb.in_use and now - sb.last_activity >= sb.idle_timeout:
                if await self._running_commands(sb):
                    sb.touch()  # a command started through the API still runs
                else:
                    await self.destroy(sb.id, EndReason.IDLE_TIMEOUT)

    async def _retry_stop(self, sb: LiveSandbox) -> None:
        try:
            await self.destroy(sb.id, sb.end_reason or EndReason.CRASHED)
        finally:
            self.retrying.discard(sb.id)

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval)
            try:
                await self._reap_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("reaper: %s", exc)

    # ---- reconciliation --------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Match the host to the store after a restart or crash: adopt what runs and should,
        stop what should not, and remove every orphan of this instance. Fails safe: when the
        store or runsc cannot answer, e2a refuses to start rather than guess."""
        rows = await retry("read the sandboxes from the database", self.records.live_rows)
        # The firewall first, from the store: internet only for those that may have it.
        await self.env.firewall.install(internet=[
            self.env.addressing.link(r.slot, r.id).host_if
            for r in rows if r.internet and r.slot is not None])
        if rows or self.runsc.available():
            containers = await retry("list runsc's sandboxes", self.runsc.list)
        else:
            containers = []
        running = {c.get("id") for c in containers if c.get("status") == "running"}
        for row in rows:
            if row.slot is None or row.slot in self.slots:
                await self.records.mark_unknown_destroyed(row.id, EndReason.SERVER_RESTART.value,
                                                          "no network slot recorded")
                continue
            sb = self._adopt(row)
            alive = (sb.state in (State.RUNNING, State.PAUSED)
                     and sb.plan.runtime_id in running and sb.expires_at > utcnow())
            if alive:
                cgroup = self._cgroup(sb)
                sb.oom_kills_seen = _oom_kills(cgroup)
                alive = self.watch.watch(sb.id, runsc_processes(cgroup.procs()))
            if alive and sb.workspace_id and not self._workspace_alive(sb):
                self.watch.unwatch(sb.id)
                async with sb.lock:  # its teardown uploads what the dead mount left
                    await self._stop(sb, EndReason.SERVER_RESTART,
                                     "its workspace mount was gone when e2a restarted")
                continue
            if alive:
                if sb.user_id is None:
                    self.pool.setdefault(sb.template, []).append(sb.id)
                self.hostlog.write(sb.id, "adopted after a restart of e2a")
            elif sb.expires_at <= utcnow() and sb.state in (State.RUNNING, State.PAUSED):
                async with sb.lock:
                    await self._stop(sb, EndReason.MAX_LIFETIME,
                                     "its max_lifetime_seconds ran out while e2a was down")
            else:
                gone = "its runsc container had stopped" if sb.state is State.RUNNING \
                    else f"its create was cut off ({row.state})"
                async with sb.lock:
                    await self._stop(sb, EndReason.SERVER_RESTART,
                                     f"not running when e2a restarted: {gone}")
        keep = resources.Keep(ids=set(self.sandboxes),
                              links={sb.link for sb in self.sandboxes.values()})
        removed = await resources.sweep_orphans(self.env, keep)
        if removed:
            log.info("removed orphans: %s", ", ".join(removed))

    def _adopt(self, row: Sandbox) -> LiveSandbox:
        recipe = recipes.load(row.template)
        plan = resources.Plan(id=row.id, slot=row.slot, internet=row.internet,
                              token=row.envd_token or self.keys.token(row.id), image=None,
                              memory_mib=row.memory_mib, platform="",
                              workspace=self.workspaces.adopt(row.workspace_id, row.user_id)
                              if row.workspace_id else None).bind(self.env)
        if plan.workspace is not None:
            plan.workspace.cache = plan.dir / resources.WorkspaceMount.CACHE
        sb = LiveSandbox(
            plan=plan, units=resources.units_for(self.env, plan, self.kinds), user_id=row.user_id,
            template=row.template, vcpu=row.vcpu, cpu_fraction=row.cpu_fraction,
            memory_mib=row.memory_mib,
            cpu_quota_us=recipe.cpu_quota_us if recipe else 100_000,
            metadata=row.metadata_ or {}, idle_timeout=row.idle_timeout_seconds,
            max_lifetime=row.max_lifetime_seconds, created_at=aware(row.created_at),
            expires_at=aware(row.expires_at), state=State(row.state),
            end_reason=EndReason(row.end_reason) if row.end_reason else None)
        self.sandboxes[sb.id] = sb
        self.slots[plan.slot] = sb.id
        return sb

    # ---- connections into a sandbox --------------------------------------------------------

    def _running(self, sandbox_id: str) -> LiveSandbox:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.state is not State.RUNNING:
            raise NotRunning(sandbox_id, sb.state.value if sb else "not running")
        sb.touch()
        return sb

    def _closed(self, up: Upstream) -> None:
        sb = self.sandboxes.get(up.sandbox_id)
        if sb is not None:
            sb.upstreams.discard(up)
            sb.touch()

    async def _connect(self, sb: LiveSandbox, open_: Callable[[], Awaitable[Any]],
                       what: str) -> Upstream:
        """Open a connection into the sandbox, given up on at once if the sandbox goes."""
        if sb.inflight + len(sb.upstreams) >= MAX_CONNECTIONS_PER_SANDBOX:
            raise TooManyConnections(f"sandbox {sb.id} already has "
                                     f"{MAX_CONNECTIONS_PER_SANDBOX} open connections")
        sb.inflight += 1
        attempt = asyncio.ensure_future(open_())
        gone = asyncio.ensure_future(sb.gone.wait())
        try:
            await asyncio.wait({attempt, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sb.inflight -= 1
            gone.cancel()
            if not attempt.done():
                attempt.cancel()
        if not attempt.done() or attempt.cancelled():
            reason = sb.end_reason.value if sb.end_reason else "stopping"
            raise Unreachable(f"the sandbox ended ({reason}) before {what} answered")
        exc = attempt.exception()
        if exc is not None:
            if what == AGENT and isinstance(exc, SANDBOX_SIDE_ERRORS):
                # Is it the request, or the sandbox? (3 tries of 2 s: not a blip.) A failure on
                # our side (the client's upload broke off) says nothing about the sandbox.
                self._probe_later(sb, 3, 2.0, f"a request failed with {exc.__class__.__name__}")
            raise Unreachable(f"{what} did not answer: {exc.__class__.__name__}") from exc
        up = Upstream(sb.id, attempt.result(), self._closed)
        if sb.gone.is_set():
            await up.abort(sb.end_reason or EndReason.CRASHED)
            up.close()
            raise Unreachable(f"the sandbox ended before {what} answered")
        sb.upstreams.add(up)
        return up

    async def agent_request(self, sandbox_id: str, method: str, path: str,
                            **kwargs: Any) -> Upstream:
        sb = self._running(sandbox_id)
        return await self._connect(sb, lambda: envd.send(
            self.http, sb.link.sandbox_ip, sb.plan.token, method, path, **kwargs), AGENT)

    async def agent_websocket(self, sandbox_id: str, path: str,
                              max_size: int = WS_MAX_MESSAGE) -> Upstream:
        sb = self._running(sandbox_id)
        return await self._connect(sb, lambda: envd.websocket(
            sb.link.sandbox_ip, sb.plan.token, path, max_size=max_size, max_queue=2,
            open_timeout=10), AGENT)

    async def port_request(self, sandbox_id: str, port: int, method: str, target: str,
                           **kwargs: Any) -> Upstream:
        sb = self._running(sandbox_id)
        url = URL(f"http://{sb.link.sandbox_ip}:{port}{target}", encoded=True)
        return await self._connect(sb, lambda: self.http.request(
            method, url, timeout=PORT_TIMEOUT, **kwargs), f"port {port}")

    async def port_websocket(self, sandbox_id: str, port: int, target: str) -> Upstream:
        sb = self._running(sandbox_id)
        return await self._connect(sb, lambda: websockets.connect(
            f"ws://{sb.link.sandbox_ip}:{port}{target}", max_size=WS_MAX_MESSAGE, max_queue=2,
            open_timeout=10),
            f"port {port}")

    async def logs(self, sandbox_id: str) -> list[dict]:
        lines = self.hostlog.read(sandbox_id)
        sb = self.sandboxes.get(sandbox_id)
        if sb is not None and sb.state is State.RUNNING:
            sb.touch()
            data = await envd.get_json(self.http, envd.base_url(sb.link.sandbox_ip) + "/logs",
                                       sb.plan.token)
            lines += (data or {}).get("lines", [])
        lines.sort(key=lambda line: line.get("ts", ""))
        return lines


def sandbox_env(recipe: recipes.Recipe, params: dict[str, str]) -> dict[str, str]:
    """What the sandbox's OCI process (envd) gets in its environment: the template's variables
    (which every command inherits) and envd's own settings (which none does)."""
    env = recipe.sandbox_env(params)
    if recipe.services:
        env["E2A_ENVD_SERVICES"] = json.dumps(recipe.envd_services(params))
    if "DISPLAY" in env:  # a desktop template: envd drives this X display
        env["E2A_ENVD_DISPLAY"] = env["DISPLAY"]
    return env


def _oom_kills(cgroup: cgroups.Cgroup) -> int:
    """How often the host's OOM killer acted in the sandbox's cgroup (0 if unreadable)."""
    try:
        return cgroup.oom_kills()
    except (AttributeError, OSError, ValueError):
        return 0

