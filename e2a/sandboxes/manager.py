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
from typing import Awaitable, Callable, TypeVar

from e2a.config import Settings
from e2a.ids import new_id
from e2a.network import links
from e2a.network.firewall import Firewall, host_nameservers
from e2a.runtime import cgroups, quota
from e2a.runtime.runsc import MEMORY_OVERHEAD_MIB, Runsc, rebase
from e2a.sandboxes import envd, resources
from e2a.sandboxes.agent_keys import AgentKeys
from e2a.sandboxes.connections import Connections
from e2a.sandboxes.lifecycle import Lifecycle
from e2a.sandboxes.host import (PAUSED, CreateFailed, CreateSpec,
                                NoCapacity, NotForkable, NotRunning,
                                PauseFailed, SandboxHost, SandboxRecord, Unavailable, Upstream,
                                UserLimit, WrongState)
from e2a.sandboxes.hostlog import HostLog
from e2a.sandboxes.records import Records, StoreCatalog, aware, pause_expiry, utcnow
from e2a.sandboxes.states import EndReason, State
from e2a.sandboxes.watch import DeathWatch, runsc_processes
from e2a.store.models import Sandbox
from e2a.templates import builder, recipes
from e2a.templates.recipes import DEFAULT_DISK_MIB
from e2a.workspaces.service import MountPlan, Workspaces

log = logging.getLogger("e2a.sandboxes")
T = TypeVar("T")
R = TypeVar("R", bound=resources.Resource)

POOL_LIFETIME = 7200  # a warm sandbox's own limits until a user claims it
OOM_RECENT = 5.0  # seconds: see LiveSandbox.oom_rose_at
# A paused sandbox's checkpoint: a subvolume in its directory, with room for its memory.
CHECKPOINT = "checkpoint"
CHECKPOINT_MARGIN_MIB = 64
# A fork's checkpoint and copied layer, in the sandboxes directory while the forks start.
FORK_STAGE = "fork-"
SECRET_LENGTH = 8  # of a template's per-sandbox secrets: VNC's authentication uses 8 characters


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
    # Pause, resume and fork (docs/pause.md).
    on_idle: str = "destroy"
    auto_resume: bool = False
    paused_at: datetime | None = None
    disk_bytes: int | None = None
    forked_from: str | None = None
    secrets_of: str | None = None  # whose per-sandbox secrets its memory holds (a fork's origin)
    pausing: bool = False  # being saved: nothing new may connect

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

    def record(self, node: str, paused_ttl: int) -> SandboxRecord:
        return SandboxRecord(
            id=self.id, user_id=self.user_id, node=node, template=self.template,
            state=self.state.value, vcpu=self.vcpu, cpu_fraction=self.cpu_fraction,
            memory_mib=self.memory_mib, internet=self.plan.internet, metadata=self.metadata,
            idle_timeout_seconds=self.idle_timeout, max_lifetime_seconds=self.max_lifetime,
            created_at=self.created_at, expires_at=self.expires_at,
            end_reason=self.end_reason.value if self.end_reason else None,
            workspace_id=self.workspace_id, on_idle=self.on_idle, auto_resume=self.auto_resume,
            paused_at=self.paused_at,
            pause_expires_at=pause_expiry(self.paused_at, paused_ttl),
            disk_bytes=self.disk_bytes, forked_from=self.forked_from, secrets_of=self.secrets_of)

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


class Manager(Lifecycle, Connections, SandboxHost):
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
        self.keys = AgentKeys.of(settings)
        self.catalog = StoreCatalog(self.records, self._live_record, self.node,
                                    settings.paused_ttl)
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
        await self.workspaces.start(only_process=True)  # one e2a per database here
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

    def _record(self, sb: LiveSandbox) -> SandboxRecord:
        return sb.record(self.node, self.settings.paused_ttl)

    def _live_record(self, sandbox_id: str) -> SandboxRecord | None:
        sb = self.sandboxes.get(sandbox_id)
        return self._record(sb) if sb is not None else None

    def list(self) -> list[str]:
        return list(self.sandboxes)

    def pool_sizes(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.pool.items()}

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
            return self._record(sb)
        finally:
            self._count_out(spec.user_id)

    def _count_in(self, user_id: str) -> None:
        """Count a create of the user's, or refuse it past E2A_MAX_SANDBOXES_PER_USER. Creates
        under way count (their sandbox may not be in self.sandboxes yet), so a create is
        counted twice for its own duration: never too few."""
        cap = self.settings.max_sandboxes_per_user
        held = sum(1 for sb in self.sandboxes.values() if sb.user_id == user_id)
        if cap and held + self._creating.get(user_id, 0) >= cap:
            raise UserLimit(cap)
        self._creating[user_id] = self._creating.get(user_id, 0) + 1

    def _count_out(self, user_id: str) -> None:
        self._creating[user_id] -= 1
        if not self._creating[user_id]:
            del self._creating[user_id]

    def _reserve(self, recipe: recipes.Recipe, spec: CreateSpec, image: Path,
                 workspace: MountPlan | None = None,
                 origin: LiveSandbox | None = None) -> LiveSandbox:
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
        if origin is not None:  # a fork: its memory, and so its secrets, are its origin's
            plan = resources.Plan(
                id=sid, slot=slot, internet=spec.internet, token=origin.plan.token, image=image,
                memory_mib=origin.memory_mib, disk_mib=recipe.disk_mib,
                platform=origin.plan.platform, env=origin.plan.env).bind(self.env)
        else:
            plan = resources.Plan(
                id=sid, slot=slot, internet=spec.internet, token=self.keys.token(sid),
                image=image, memory_mib=recipe.memory_mib, disk_mib=recipe.disk_mib,
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
            expires_at=now + timedelta(seconds=spec.max_lifetime), on_idle=spec.on_idle,
            auto_resume=spec.auto_resume)
        if origin is not None:
            sb.forked_from, sb.secrets_of = origin.id, origin.secrets_of or origin.id
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
                await self.workspaces.release(workspace)
            raise
        try:
            await self.records.insert(self._row(sb, spec.env_vars),
                                      "create" if spec.user_id else "warm_pool")
        except BaseException:
            self._release(sb)
            if workspace is not None:
                await self.workspaces.release(workspace)
            raise
        await self._boot_and_wait(sb, self._boot(sb, spec.env_vars))
        return sb

    @staticmethod
    def _row(sb: LiveSandbox, env_vars: dict[str, str]) -> Sandbox:
        return Sandbox(
            id=sb.id, user_id=sb.user_id, template=sb.template, state=State.CREATING.value,
            vcpu=sb.vcpu, cpu_fraction=sb.cpu_fraction, memory_mib=sb.memory_mib,
            internet=sb.plan.internet, metadata_=sb.metadata, env_vars=env_vars,
            idle_timeout_seconds=sb.idle_timeout, max_lifetime_seconds=sb.max_lifetime,
            slot=sb.plan.slot, envd_token="", created_at=sb.created_at,
            expires_at=sb.expires_at, workspace_id=sb.workspace_id, on_idle=sb.on_idle,
            auto_resume=sb.auto_resume, forked_from=sb.forked_from, secrets_of=sb.secrets_of)

    async def _plan_workspace(self, spec: CreateSpec) -> MountPlan:
        """Find (or make) the scope's workspace, size its mount and lease it (so that it cannot
        be deleted under the create): the lease goes with the sandbox, released once it is
        gone (`_stop`)."""
        if not Path(self.settings.rclone).is_file():
            raise Unavailable(f"rclone not found at {self.settings.rclone} (run `make build`)")
        return await self.workspaces.plan_for_create(spec.workspace)

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
                sb.on_idle, sb.auto_resume = spec.on_idle, spec.auto_resume
                sb.touch()
                await self.records.claim(
                    sid, spec.user_id, spec.metadata, internet=spec.internet,
                    env_vars=spec.env_vars, idle_timeout_seconds=spec.idle_timeout,
                    max_lifetime_seconds=spec.max_lifetime, created_at=sb.created_at,
                    expires_at=sb.expires_at, on_idle=spec.on_idle,
                    auto_resume=spec.auto_resume)
                self.hostlog.write(sid, f"handed out from the warm pool to {spec.user_id}")
                return self._record(sb)
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

    # ---- pause, resume, fork (docs/pause.md) -----------------------------------------------

    def _user_sandbox(self, sandbox_id: str) -> LiveSandbox:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.user_id is None:
            raise WrongState(f"sandbox {sandbox_id} is destroyed", State.DESTROYED.value)
        return sb

    @staticmethod
    def _must_be(sb: LiveSandbox, state: State, to_be: str) -> None:
        """WrongState (409) unless the sandbox is in `state`, naming the state it is in."""
        if sb.state is not state:
            raise WrongState(f"sandbox {sb.id} is {sb.state.value}; only a {state.value} "
                             f"sandbox can be {to_be}", sb.state.value)

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        sb = self._user_sandbox(sandbox_id)
        async with sb.lock:
            self._must_be(sb, State.RUNNING, "paused")
            await self._pause(sb)
        return self._record(sb)

    async def _pause(self, sb: LiveSandbox) -> None:
        """Save the sandbox's memory and kernel state (runsc checkpoint), end its host
        processes and cgroup, flush its workspace to S3 and unmount it. Its network link,
        writable layer and directory stay, for the resume. The caller holds `sb.lock`."""
        t0 = time.perf_counter()
        image = sb.plan.dir / CHECKPOINT
        sb.pausing = True  # from here nothing new connects (`_running`)
        try:
            try:
                if image.exists():  # a failed attempt's
                    await resources.remove_dir(image)
                await asyncio.to_thread(quota.create_volume, image, self._image_limit(sb))
            except Exception as exc:
                raise PauseFailed(f"sandbox {sb.id} could not be paused (no room for its "
                                  f"checkpoint: {exc}); it runs on") from exc
            self.watch.unwatch(sb.id)  # its processes are about to exit: no death
            try:
                await self.runsc.checkpoint(sb.plan.runtime_id, image)
            except Exception as exc:
                await self._pause_failed(sb, image, exc)
            # Saved and stopped: its connections get no answer any more (their far end was in
            # the Sentry), so they are cut now, saying why. Not before: a pause that fails
            # leaves them be.
            await asyncio.gather(*(up.abort(PAUSED) for up in list(sb.upstreams)),
                                 return_exceptions=True)
            await self._saved(sb, t0)
        finally:
            sb.pausing = False

    async def _saved(self, sb: LiveSandbox, t0: float | None = None) -> None:
        """The checkpoint is saved: from here on the sandbox is paused whatever else fails
        (what is left of its container or cgroup goes at the resume or the destroy). `t0`:
        when the pause began (None: a pause cut off by a restart of e2a)."""
        try:
            await self.runsc.delete(sb.plan.runtime_id)
            await resources.empty_and_remove(self._cgroup(sb))
        except Exception as exc:
            log.warning("%s: host processes left at pause: %s", sb.id, exc)
        await self._unmount_workspace(sb)
        disk = await asyncio.to_thread(self._disk_bytes, sb)
        now = utcnow()
        how = (f"in {1000 * (time.perf_counter() - t0):.0f} ms" if t0 is not None
               else "(its pause was cut off by a restart of e2a)")
        try:
            await self._move(sb, State.PAUSED, "paused", f"{how}, {disk} bytes on disk",
                             paused_at=now, disk_bytes=disk)
        except Exception as exc:  # the host's truth; the row is fixed by the next move
            log.error("recording %s paused failed: %s", sb.id, exc)
            sb.state = State.PAUSED
        sb.paused_at, sb.disk_bytes = now, disk
        self.hostlog.write(sb.id, f"paused {how} ({disk} bytes on disk)")

    async def _pause_failed(self, sb: LiveSandbox, image: Path, exc: Exception) -> None:
        """The checkpoint failed: if the sandbox still runs it carries on as before, else it is
        lost and destroyed. Raises PauseFailed either way."""
        state = await self.runsc.state(sb.plan.runtime_id)
        if (state or {}).get("status") == "running" and self.watch.watch(
                sb.id, runsc_processes(self._cgroup(sb).procs())):
            await resources.remove_dir(image)
            self.hostlog.write(sb.id, f"pause failed, running on: {exc}")
            raise PauseFailed(f"sandbox {sb.id} could not be paused ({exc}); it runs on")
        await self._stop(sb, EndReason.CRASHED, f"its checkpoint failed: {exc}")
        raise PauseFailed(f"sandbox {sb.id} could not be paused and was lost: {exc}")

    def _image_limit(self, sb: LiveSandbox) -> int:
        """The most a checkpoint of the sandbox can take: its memory, gVisor's own, a margin."""
        return (sb.memory_mib + MEMORY_OVERHEAD_MIB + CHECKPOINT_MARGIN_MIB) * quota.MiB

    @staticmethod
    def _disk_bytes(sb: LiveSandbox) -> int:
        """What the paused sandbox holds on disk: its writes (rootfs, /tmp) and checkpoint."""
        return sum(quota.allocated(sb.plan.dir / d) for d in ("upper", "tmp", CHECKPOINT))

    def _unit(self, sb: LiveSandbox, kind: type[R]) -> R | None:
        return next((u for u in sb.units if isinstance(u, kind)), None)

    async def _unmount_workspace(self, sb: LiveSandbox) -> None:
        """Upload the workspace and unmount it; its lease stays with the sandbox. If S3 does not
        take everything now, the mount stays (its files safe in its cache) and is used again
        by the resume, or flushed by the destroy."""
        unit = self._unit(sb, resources.WorkspaceMount)
        if unit is None or sb.plan.workspace is None:
            return
        try:
            await unit.destroy()
        except Exception as exc:
            log.warning("%s: workspace not flushed at pause, kept mounted: %s", sb.id, exc)
            self.hostlog.write(sb.id, f"workspace not flushed at pause (kept mounted): {exc}")

    async def resume(self, sandbox_id: str, wake: bool = False) -> SandboxRecord:
        """`wake`: a call into a sandbox created with auto_resume; one that runs is fine."""
        sb = self._user_sandbox(sandbox_id)
        async with sb.lock:
            if not (wake and sb.state is State.RUNNING):
                self._must_be(sb, State.PAUSED, "resumed")
                await self._resume(sb)
        return self._record(sb)

    async def _resume(self, sb: LiveSandbox) -> None:
        """Restore the sandbox from its checkpoint in its own network namespace, cgroup and
        workspace mount. On failure it stays paused, its checkpoint kept: a retry may work."""
        t0 = time.perf_counter()
        image = sb.plan.dir / CHECKPOINT
        try:
            await links.arm(sb.link)
            await self._mount_workspace(sb)
            await resources.uninterrupted(self.runsc.restore(
                resources.RunscContainer.spec(self.env, sb.plan), image))
            await self._agent_up(sb, {})
        except BaseException as exc:
            await resources.uninterrupted(self._undo_resume(sb, exc))
            if isinstance(exc, Exception):
                raise PauseFailed(f"sandbox {sb.id} could not be resumed ({exc}); it stays "
                                  "paused: try again") from exc
            raise
        ms = 1000 * (time.perf_counter() - t0)
        # max_lifetime_seconds counts running time: the pause moves the end out
        sb.expires_at += utcnow() - (sb.paused_at or utcnow())
        await self._move(sb, State.RUNNING, "resumed", f"{ms:.0f} ms", paused_at=None,
                         disk_bytes=None, expires_at=sb.expires_at)
        sb.paused_at = sb.disk_bytes = None
        sb.touch()
        self.hostlog.write(sb.id, f"resumed in {ms:.0f} ms")
        # Its pages are all loaded (a restore without --background): the image can go. Renamed
        # first, so that a pause right after never meets it.
        old = sb.plan.dir / f"{CHECKPOINT}.{new_id('old')}"
        image.rename(old)
        self._in_background(resources.remove_dir(old))

    async def _mount_workspace(self, sb: LiveSandbox) -> None:
        unit = self._unit(sb, resources.WorkspaceMount)
        if unit is None or sb.plan.workspace is None or self._workspace_alive(sb):
            return
        sb.plan.workspace.fresh = False  # seeded at create, never again
        await unit.create()

    async def _undo_resume(self, sb: LiveSandbox, exc: BaseException) -> None:
        self.watch.unwatch(sb.id)
        await self.runsc.delete(sb.plan.runtime_id)
        try:
            await resources.empty_and_remove(self._cgroup(sb))
        except Exception as cg:
            log.error("%s: cgroup left after a failed resume: %s", sb.id, cg)
        log.warning("resume of %s failed: %s", sb.id, exc)
        self.hostlog.write(sb.id, f"resume failed, still paused: {exc!r}"[:500])

    async def fork(self, sandbox_id: str, count: int) -> list[SandboxRecord]:
        """`count` new sandboxes restored from one checkpoint of a running one, each with its
        own id, network, writable layer (a copy of the origin's) and cgroup. All or none: if
        one cannot start, the others are destroyed again."""
        src = self._user_sandbox(sandbox_id)
        self._must_be(src, State.RUNNING, "forked")
        if src.plan.workspace is not None:
            raise NotForkable(f"sandbox {src.id} has a workspace on /home/user, which one "
                              "sandbox mounts at a time: it cannot be forked")
        recipe = recipes.load(src.template)
        if recipe is None:
            raise Unavailable(f"template {src.template!r} is not available")
        image = self.check_runtime(recipe)
        spec = CreateSpec(user_id=src.user_id, template=src.template,
                          metadata=dict(src.metadata), idle_timeout=src.idle_timeout,
                          max_lifetime=src.max_lifetime, internet=src.plan.internet,
                          on_idle=src.on_idle, auto_resume=src.auto_resume)
        counted, forks, rows = 0, [], 0
        stage = self.env.sandboxes_dir / f"{FORK_STAGE}{new_id('f')}"
        try:
            for _ in range(count):
                self._count_in(src.user_id)
                counted += 1
            for _ in range(count):
                forks.append(self._reserve(recipe, spec, image, origin=src))
            for sb in forks:
                await self.records.insert(self._row(sb, {}), "fork")
                rows += 1
            async with src.lock:
                self._must_be(src, State.RUNNING, "forked")
                await self._stage_fork(src, stage)
                config = json.loads((src.plan.dir / "config.json").read_text())
            for sb in forks:
                sb.plan.seed, sb.plan.restore_image = stage, stage / CHECKPOINT
                sb.plan.restore_config = rebase(
                    config, resources.RunscContainer.spec(self.env, sb.plan))
                sb.boot_task = asyncio.create_task(self._boot(sb, {}), name=f"fork {sb.id}")
            done = await asyncio.gather(*(asyncio.shield(sb.boot_task) for sb in forks),
                                        return_exceptions=True)
            failed = [r for r in done if isinstance(r, BaseException)]
            if failed:
                raise CreateFailed(f"{len(failed)} of {count} forks of {src.id} could not "
                                   f"start: {failed[0]}")
            for sb in forks:
                self.hostlog.write(sb.id, f"forked from {src.id}")
            return [self._record(sb) for sb in forks]
        except BaseException:
            for sb in forks[rows:]:  # never stored, nothing of them made
                self._release(sb)
            await resources.uninterrupted(asyncio.gather(*(
                self.destroy(sb.id, EndReason.CREATE_FAILED, "its fork was undone")
                for sb in forks[:rows]), return_exceptions=True))
            raise
        finally:
            for _ in range(counted):
                self._count_out(src.user_id)
            if stage.exists():
                await resources.uninterrupted(resources.remove_dir(stage))

    async def _stage_fork(self, src: LiveSandbox, stage: Path) -> None:
        """One checkpoint of `src` and a copy of its writable layer and /tmp, taken while it is
        frozen so that they agree; it runs on after (its processes never notice)."""
        limit = self._image_limit(src) + src.plan.disk_mib * quota.MiB
        await asyncio.to_thread(quota.create_volume, stage, limit)
        (stage / CHECKPOINT).mkdir()
        rid = src.plan.runtime_id
        await self.runsc.freeze(rid)
        try:
            await self.runsc.checkpoint(rid, stage / CHECKPOINT, leave_running=True)
            await resources.copy_tree(src.plan.dir / "upper", stage / "upper")
            await resources.copy_tree(src.plan.dir / "tmp", stage / "tmp")
        finally:
            await self.runsc.thaw(rid)

    # ---- destroy (Lifecycle.destroy, then this) ---------------------------------------------

    async def _stop(self, sb: LiveSandbox, reason: EndReason, detail: str | None = None) -> None:
        """The one teardown path. The caller holds `sb.lock`."""
        self.watch.unwatch(sb.id)
        for ready in self.pool.values():
            if sb.id in ready:
                ready.remove(sb.id)
        said = await self._stopping(sb, reason, detail)
        if said is None:
            return
        reason, detail = said
        failed = await resources.teardown(sb.units)
        if failed:
            self.stuck.add(sb.id)
            self.hostlog.write(sb.id, f"teardown incomplete, retrying: {'; '.join(failed)}")
            return
        self._unstuck(sb)
        self._release(sb)
        if sb.plan.workspace:  # counted again now that all is in S3; its lease ends after that
            await self.workspaces.mark_ended(sb.id, sb.plan.workspace)
            self._in_background(self.workspaces.ended(sb.plan.workspace))
        await self._destroyed(sb, reason, detail)

    # ---- death -----------------------------------------------------------------------------

    def _on_death(self, sandbox_id: str, pid: int) -> None:
        self._in_background(self._died(sandbox_id, pid))

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

    def addresses(self, sandbox_id: str) -> tuple[str, str]:
        sb = self._running(sandbox_id)
        return sb.link.host_ip, sb.link.sandbox_ip

    async def _running_commands(self, sb: LiveSandbox) -> int:
        data = await envd.get_json(self.http, envd.base_url(sb.link.sandbox_ip) + "/commands",
                                   sb.plan.token)
        return len(data.get("commands", [])) if data else 0

    async def _reap_once(self) -> None:
        now_wall, now = utcnow(), time.monotonic()
        for sb in list(self.sandboxes.values()):
            if self._retry_if_stuck(sb, now):
                continue
            if sb.state is State.PAUSED:
                expiry = pause_expiry(sb.paused_at, self.settings.paused_ttl)
                if expiry is not None and now_wall >= expiry:
                    await self.destroy(sb.id, EndReason.PAUSED_EXPIRED,
                                       f"paused for longer than {self.settings.paused_ttl} s")
                continue
            if sb.state is not State.RUNNING or sb.user_id is None or sb.pausing:
                continue
            if now_wall >= sb.expires_at:
                await self.destroy(sb.id, EndReason.MAX_LIFETIME)
            elif not sb.in_use and now - sb.last_activity >= sb.idle_timeout:
                if await self._running_commands(sb):
                    sb.touch()  # a command started through the API still runs
                elif sb.on_idle == "pause":
                    sb.touch()  # not again while this pause runs
                    self._in_background(self._pause_idle(sb))
                else:
                    await self.destroy(sb.id, EndReason.IDLE_TIMEOUT)

    async def _pause_idle(self, sb: LiveSandbox) -> None:
        """on_idle "pause": in the background, so that a slow workspace flush holds up no other
        sandbox's timeouts. A sandbox used again meanwhile stays running."""
        async with sb.lock:
            if sb.state is not State.RUNNING or sb.in_use:
                return
            try:
                await self._pause(sb)
            except PauseFailed as exc:
                log.warning("idle pause: %s", exc)

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
        # Frozen: a fork's origin when e2a stopped in the middle of the fork (nothing else is
        # ever left frozen). It is thawed, and runs on.
        for c in containers:
            if c.get("status") == "paused" and c.get("id"):
                try:
                    await self.runsc.thaw(c["id"])
                    running.add(c["id"])
                except Exception as exc:
                    log.error("could not thaw %s, frozen by a cut-off fork: %s", c["id"], exc)
        for row in rows:
            if row.slot is None or row.slot in self.slots:
                await self.records.mark_unknown_destroyed(row.id, EndReason.SERVER_RESTART.value,
                                                          "no network slot recorded")
                continue
            lease = (await self.workspaces.adopt(row.workspace_id, row.user_id, row.id)
                     if row.workspace_id else None)
            sb = self._adopt(row, lease)
            if sb.state is State.PAUSED:
                await self._adopt_paused(sb, {c.get("id") for c in containers})
                continue
            if sb.state is State.RUNNING and (sb.plan.dir / CHECKPOINT).exists():
                await self._pause_settled(sb, running)
            alive = (sb.state is State.RUNNING
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
            elif sb.expires_at <= utcnow() and sb.state is State.RUNNING:
                async with sb.lock:
                    await self._stop(sb, EndReason.MAX_LIFETIME,
                                     "its max_lifetime_seconds ran out while e2a was down")
            elif sb.state is State.RUNNING and self._checkpointed(sb):
                await self._finish_pause(sb)
            else:
                gone = "its runsc container had stopped" if sb.state is State.RUNNING \
                    else f"its create was cut off ({row.state})"
                async with sb.lock:
                    await self._stop(sb, EndReason.SERVER_RESTART,
                                     f"not running when e2a restarted: {gone}")
        for sb in self.sandboxes.values():  # images of resumes cut off before their removal
            for old in sb.plan.dir.glob(f"{CHECKPOINT}.*"):
                await resources.remove_dir(old)
        keep = resources.Keep(ids=set(self.sandboxes),
                              links={sb.link for sb in self.sandboxes.values()})
        removed = await resources.sweep_orphans(self.env, keep)
        if removed:
            log.info("removed orphans: %s", ", ".join(removed))

    async def _pause_settled(self, sb: LiveSandbox, running: set[str],
                             wait: float = 30.0) -> None:
        """A running sandbox with a checkpoint: e2a stopped during its pause. runsc saves on
        without e2a and the sandbox exits once saved, so wait for that (bounded): then it is
        no longer `running` (and reconcile pauses it). One that runs on had a pause that
        failed: its leftover image goes."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            state = await self.runsc.state(sb.plan.runtime_id)
            if (state or {}).get("status") != "running":
                running.discard(sb.plan.runtime_id)
                return
            await asyncio.sleep(0.1)
        await resources.remove_dir(sb.plan.dir / CHECKPOINT)

    @staticmethod
    def _checkpointed(sb: LiveSandbox) -> bool:
        """Whether the sandbox's checkpoint is whole: runsc writes its state file last, and
        stops the sandbox only after a whole save."""
        return (sb.plan.dir / CHECKPOINT / "checkpoint.img").is_file()

    async def _finish_pause(self, sb: LiveSandbox) -> None:
        """A pause cut off by the restart after its checkpoint was saved (the sandbox stopped,
        the store still says running): it is paused, not lost."""
        async with sb.lock:
            await self._saved(sb)

    async def _adopt_paused(self, sb: LiveSandbox, containers: set[str]) -> None:
        """A paused sandbox stays paused if its checkpoint is whole. A container of it that runs
        is a resume cut off by the restart (the store still says paused): it goes, and the
        checkpoint is resumed again when asked."""
        if self._checkpointed(sb):
            if sb.plan.runtime_id in containers:
                await self.runsc.delete(sb.plan.runtime_id)
                await resources.empty_and_remove(self._cgroup(sb))
            self.hostlog.write(sb.id, "adopted paused after a restart of e2a")
            return
        async with sb.lock:
            await self._stop(sb, EndReason.SERVER_RESTART,
                             "its checkpoint was gone when e2a restarted")

    def _adopt(self, row: Sandbox, workspace: MountPlan | None) -> LiveSandbox:
        recipe = recipes.load(row.template)
        plan = resources.Plan(id=row.id, slot=row.slot, internet=row.internet,
                              token=row.envd_token or self.keys.token(row.secrets_of or row.id),
                              image=None, memory_mib=row.memory_mib,
                              disk_mib=recipe.disk_mib if recipe else DEFAULT_DISK_MIB,
                              platform=self.settings.platform or (recipe.platform if recipe
                                                                  else ""),
                              workspace=workspace).bind(self.env)
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
            end_reason=EndReason(row.end_reason) if row.end_reason else None,
            on_idle=row.on_idle, auto_resume=row.auto_resume, paused_at=aware(row.paused_at),
            disk_bytes=row.disk_bytes, forked_from=row.forked_from, secrets_of=row.secrets_of)
        self.sandboxes[sb.id] = sb
        self.slots[plan.slot] = sb.id
        return sb

    # ---- connections into a sandbox --------------------------------------------------------

    def _running(self, sandbox_id: str) -> LiveSandbox:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.state is not State.RUNNING or sb.pausing:
            raise NotRunning(sandbox_id, "pausing" if sb and sb.pausing else
                             sb.state.value if sb else "not running")
        sb.touch()
        return sb

    def _address(self, sb: LiveSandbox) -> str:
        return sb.link.sandbox_ip

    def _token(self, sb: LiveSandbox) -> str:
        return sb.plan.token

    def _agent_failed(self, sb: LiveSandbox, exc: BaseException) -> None:
        # Is it the request, or the sandbox? (3 tries of 2 s: not a blip.)
        self._probe_later(sb, 3, 2.0, f"a request failed with {exc.__class__.__name__}")

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

