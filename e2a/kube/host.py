"""The Kubernetes backend (E2A_BACKEND=kubernetes): the sandbox host interface of
sandboxes/host.py, with each sandbox a gVisor pod (docs/kubernetes.md).

What it shares with the embedded backend: the store's rows and transition feed (records.py),
the state machine, envd and its signed protocol, the per-sandbox token derived from e2a's key,
the catalog. What is its own: the cluster holds the sandbox (pod, secret, network policy), the
pod's address is where envd answers, and the cluster's watch tells a death.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from e2a.config import Settings
from e2a.ids import new_id
from e2a.kube import cluster as kc
from e2a.kube import images, manifests, node_mounts, policy_probe
from e2a.kube.replicas import Replica
from e2a.network.firewall import host_nameservers
from e2a.sandboxes import envd
from e2a.sandboxes.agent_keys import AgentKeys
from e2a.sandboxes.connections import Connections
from e2a.sandboxes.host import (CreateSpec, NoCapacity,
                                NotRunning, SandboxHost, SandboxRecord, Unavailable, Upstream,
                                UserLimit, WrongState)
from e2a.sandboxes.hostlog import HostLog
from e2a.sandboxes.lifecycle import Lifecycle
from e2a.sandboxes.manager import POOL_LIFETIME, SECRET_LENGTH, StartupError, sandbox_env
from e2a.sandboxes.records import Records, StoreCatalog, aware, record_of, utcnow
from e2a.sandboxes.resources import uninterrupted
from e2a.sandboxes.states import BOOTING, LIVE, EndReason, State
from e2a.store.models import Sandbox
from e2a.templates import recipes
from e2a.workspaces.service import MountPlan, Workspaces

log = logging.getLogger("e2a.kube")

POD_START_TIMEOUT = 120.0  # an image the node has: about a second; a pull may take long
GONE_TIMEOUT = 30.0         # a deleted pod's kubelet teardown
ACTIVITY_FLUSH = 1.0        # seconds between writes of the sandboxes used through this replica
CLOCK_SLACK = 1.0           # seconds replicas' clocks may differ (NTP keeps nodes far closer)
SWEEP_EVERY = 5.0           # seconds between the leader's sweeps for what no replica finished
ALLOCATABLE_TTL = 10.0      # seconds the cluster's allocatable resources are taken as known
POOL_CLAIM_TRIES = 5        # warm sandboxes one create tries (another replica may be first)


@dataclass
class KubeSandbox:
    """A sandbox this process knows about: made here, adopted at start, or looked up."""
    id: str
    user_id: str | None
    template: str
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    internet: bool
    metadata: dict[str, str]
    idle_timeout: int
    max_lifetime: int
    created_at: datetime
    expires_at: datetime
    token: str
    state: State = State.CREATING
    ip: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    last_activity: float = field(default_factory=time.monotonic)
    inflight: int = 0
    upstreams: set[Upstream] = field(default_factory=set)
    end_reason: EndReason | None = None
    boot_task: asyncio.Task | None = None
    workspace_id: str | None = None
    workspace: MountPlan | None = None  # its lease, if this replica made it
    node_name: str | None = None  # where its workspace is mounted

    @property
    def name(self) -> str:
        return manifests.pod_name(self.id)

    @property
    def in_use(self) -> bool:
        return self.inflight > 0 or bool(self.upstreams)

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def record(self, node: str) -> SandboxRecord:
        return SandboxRecord(
            id=self.id, user_id=self.user_id, node=node, template=self.template,
            state=self.state.value, vcpu=self.vcpu, cpu_fraction=self.cpu_fraction,
            memory_mib=self.memory_mib, internet=self.internet, metadata=self.metadata,
            idle_timeout_seconds=self.idle_timeout, max_lifetime_seconds=self.max_lifetime,
            created_at=self.created_at, expires_at=self.expires_at,
            end_reason=self.end_reason.value if self.end_reason else None,
            workspace_id=self.workspace_id)


class KubeHost(Lifecycle, Connections, SandboxHost):
    """One replica of e2a on the cluster. Replicas share the database and the cluster, and
    nothing else: a sandbox is in the memory of the replicas that made it, use it or end it
    (`_find` learns of it from its row and its pod), moves only from the state its row holds
    (`conditional_moves`), and its pod's death is seen by every replica's watch. The leader
    (replicas.py) alone reaps, refills the warm pool and finishes what a dead replica left."""

    conditional_moves = True

    def __init__(self, settings: Settings, sessions: async_sessionmaker):
        self.settings = settings
        self.node = f"kubernetes/{settings.kube_namespace}"
        self.records = Records(sessions)
        self.sessions = sessions
        self.replica = Replica(sessions.kw["bind"], settings.instance)
        self.keys = AgentKeys.of(settings)
        self.workspaces = Workspaces(settings, sessions)
        # the store, not this process's memory, answers: another replica may have moved it
        self.catalog = StoreCatalog(self.records, lambda _: None, self.node,
                                    settings.paused_ttl)
        self.hostlog = HostLog(settings.data_dir / "logs")
        self.http = envd.make_client()
        self.cluster: kc.Cluster | None = None
        self.mounts: node_mounts.NodeMounts | None = None
        self.api_namespace = kc.own_namespace(settings.kube_config)  # None: outside the cluster
        self.sandboxes: dict[str, KubeSandbox] = {}
        self._reserved: dict[str, KubeSandbox] = {}  # capacity taken, row not yet written
        self._allocatable: tuple[float, tuple[int, int]] | None = None
        self.runtime = kc.Runtime()  # the RuntimeClass's scheduling, read at start
        self._pool_counts: dict[str, int] = {}
        self._flushed: dict[str, float] = {}
        self._swept_at = 0.0
        self._releasing: set[str] = set()  # leftover workspace mounts being released
        self.stuck: set[str] = set()
        self.retrying: set[str] = set()
        self.retry_at: dict[str, tuple[float, float]] = {}
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._stop_listeners: list[Callable[[str, EndReason], None]] = []

    # ---- startup and shutdown -------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        if self.api_namespace is not None and not s.kube_nameservers:
            raise StartupError("E2A_KUBE_NAMESERVERS is unset: in the cluster, e2a's own "
                               "resolvers are the cluster's DNS, which sandboxes must not use; "
                               "name resolvers outside the cluster (docs/kubernetes.md)")
        if self.replica.shared and not s.agent_key:
            raise StartupError("E2A_AGENT_KEY is unset: replicas on one database must share "
                               "the key envd tokens and access tokens are derived from (a key "
                               "of each replica's own would make every other's calls fail)")
        try:
            self.cluster = kc.Cluster(kc.connect(s.kube_config, s.kube_namespace),
                                      s.kube_namespace, s.instance)
            self.runtime = await self.cluster.runtime(s.kube_runtime_class)
            if self.runtime is None:
                raise StartupError(f"the cluster has no RuntimeClass {s.kube_runtime_class!r} "
                                   "(E2A_KUBE_RUNTIME_CLASS): sandboxes would run without "
                                   "gVisor")
            if (wrong := self._not_gvisor(self.runtime)) is not None:
                raise StartupError(wrong)
        except StartupError:
            raise
        except Exception as exc:
            raise StartupError(f"cannot reach the Kubernetes API: {exc}") from exc
        if s.kube_allow_unenforced_policies:
            log.warning("NetworkPolicy enforcement not checked: E2A_KUBE_ALLOW_UNENFORCED_POLICIES"
                        " accepts that sandboxes may reach each other and the cluster")
        elif not await self._probe_policies():
            raise StartupError(
                "this cluster does not enforce NetworkPolicy (a probe pod stayed reachable under "
                "a policy that denies it all ingress): sandboxes could reach each other and the "
                "cluster. Use a CNI that enforces policies, or set "
                "E2A_KUBE_ALLOW_UNENFORCED_POLICIES=true to accept that risk")
        self.mounts = node_mounts.NodeMounts(self.http, self.cluster, s.kube_node_token,
                                             s.kube_node_port)
        self.workspaces.replica = self.replica.key
        self.workspaces.remote_cache = lambda sandbox_id, node: node_mounts.AgentCache(
            self.mounts, node, sandbox_id)
        await self.workspaces.start(only_process=False)
        self._tasks.append(asyncio.create_task(self._watch_deaths(), name="pod watch"))
        # leading from the start (alone, or the first of several): the sweep runs before e2a
        # answers, so a sandbox whose pod went while no e2a ran is already ended
        await self.replica.start(lambda: self._sweep(restart=True))
        for loop, name in ((self._reaper, "reaper"), (self._flush_activity, "activity"),
                           (self._pool_filler, "pool")):
            self._tasks.append(asyncio.create_task(loop(), name=name))

    def _nameservers(self) -> list[str]:
        return self.settings.kube_nameservers or host_nameservers()

    async def _probe_policies(self) -> bool:
        try:
            return await policy_probe.policies_enforced(self.cluster, self._probe_plan(),
                                                        self.settings.kube_namespace)
        except Exception as exc:
            raise StartupError(f"the NetworkPolicy probe failed: {exc}") from exc

    def _probe_plan(self) -> manifests.PodPlan:
        """The policy probe's pod: the smallest sandbox of the standard template's image."""
        s = self.settings
        sid = f"probe_{secrets.token_hex(4)}"
        return manifests.PodPlan(
            sandbox_id=sid, instance=policy_probe.probe_instance(s.instance),
            template="standard", user_id=None, image=images.ref(s, recipes.load("standard")),
            vcpu=1, cpu_fraction=0.25, memory_mib=128, disk_mib=256, internet=False,
            envd_token=self.keys.token(sid), runtime_class=s.kube_runtime_class,
            nameservers=self._nameservers(), api_cidrs=s.kube_api_cidrs,
            api_namespace=self.api_namespace, non_root=s.kube_non_root,
            writable=self._writable(recipes.load("standard")))

    def _writable(self, recipe: recipes.Recipe) -> tuple[str, ...] | None:
        """What stays writable in this template's pods; None: their root does."""
        read_only = self.settings.kube_read_only_root and recipe.read_only_root
        return recipe.writable if read_only else None

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        boots = [sb.boot_task for sb in self.sandboxes.values()
                 if sb.boot_task and not sb.boot_task.done()]
        for b in boots:
            b.cancel()
        await asyncio.gather(*boots, return_exceptions=True)
        await self.replica.stop()
        await self.workspaces.stop(mounts_left=False)
        await self.http.close()
        if self.cluster is not None:
            await self.cluster.close()

    # ---- what this replica knows ----------------------------------------------------------

    def list(self) -> list[str]:
        return list(self.sandboxes)

    def pool_sizes(self) -> dict[str, int]:
        return dict(self._pool_counts)

    def replica_key(self) -> int | None:
        return self.replica.key if self.replica.shared else None

    async def replica_gone(self, key: int | None) -> bool:
        return await self.replica.gone(key)

    async def replica_alive_now(self, key: int | None) -> bool:
        return key is not None and await self.replica.alive_now(key)

    def addresses(self, sandbox_id: str) -> tuple[str, str]:
        """(this replica's egress proxy as pods reach it, the pod's address): an agent's task
        runs on the replica that starts it, and its CLI calls that replica's proxy."""
        sb = self._running(sandbox_id)
        return self.settings.kube_egress_host, sb.ip or ""

    def _adopt(self, row: Sandbox, ip: str | None = None) -> KubeSandbox:
        """This process's copy of a sandbox from its row (made by another replica, or
        before a restart)."""
        sb = self.sandboxes.get(row.id)
        if sb is not None:
            return sb
        rec = record_of(row, self.node)
        sb = KubeSandbox(
            id=row.id, user_id=row.user_id, template=row.template, vcpu=row.vcpu,
            cpu_fraction=row.cpu_fraction, memory_mib=row.memory_mib, internet=row.internet,
            metadata=row.metadata_ or {}, idle_timeout=row.idle_timeout_seconds,
            max_lifetime=row.max_lifetime_seconds, created_at=rec.created_at,
            expires_at=rec.expires_at, token=self.keys.token(row.id), state=State(row.state),
            ip=ip, workspace_id=row.workspace_id, node_name=row.node_name)
        self.sandboxes[sb.id] = sb
        return sb

    async def _find(self, sandbox_id: str) -> None:
        """A running sandbox this process does not know yet: known from its row and its
        pod's address (one lookup each, then from memory)."""
        if sandbox_id in self.sandboxes or len(sandbox_id) > 32:
            return
        row = await self.records.get(sandbox_id)
        if row is None or row.state != State.RUNNING.value:
            return
        ip = await self.cluster.pod_ip(manifests.pod_name(sandbox_id))
        if ip is not None:
            self._adopt(row, ip)

    # ---- create ----------------------------------------------------------------------------

    async def create(self, spec: CreateSpec) -> SandboxRecord:
        recipe = recipes.load(spec.template)
        if recipe is None:
            raise Unavailable(f"template {spec.template!r} is not available")
        await self._within_user_limit(spec.user_id)
        if spec.workspace is None:  # a workspace is mounted at boot: no warm pod has it
            claimed = await self._claim_from_pool(recipe, spec)
            if claimed is not None:
                return claimed
        sb = await self._launch(recipe, spec)
        return sb.record(self.node)

    async def _plan_workspace(self, spec: CreateSpec) -> MountPlan:
        """The scope's workspace, found or made, and leased (as on the embedded backend,
        manager.py): the lease goes with the sandbox, released once it is gone (`_stop`)."""
        if not self.mounts.enabled:
            raise Unavailable("workspaces on Kubernetes need E2A_KUBE_NODE_TOKEN and `e2a "
                              "node-agent` on every node (docs/kubernetes.md, \"Workspaces\")")
        return await self.workspaces.plan_for_create(spec.workspace)

    async def _launch(self, recipe: recipes.Recipe, spec: CreateSpec) -> KubeSandbox:
        workspace = await self._plan_workspace(spec) if spec.workspace is not None else None
        try:
            sb = await self._reserve(recipe, spec)
        except BaseException:
            if workspace is not None:
                await self.workspaces.release(workspace)
            raise
        if workspace is not None:
            sb.workspace, sb.workspace_id = workspace, workspace.workspace_id
        try:
            try:
                if workspace is not None:  # before its row: whoever ends it ends the lease
                    await self.workspaces.bind(workspace, sb.id)
                await self.records.insert(self._row(sb, spec.env_vars),
                                          "create" if spec.user_id else "warm_pool",
                                          user_cap=self.settings.max_sandboxes_per_user)
            except BaseException:
                self.sandboxes.pop(sb.id, None)
                if workspace is not None:
                    await self.workspaces.release(workspace)
                raise
            await self._boot_and_wait(sb, self._boot(sb, recipe, spec))
        finally:  # counted by its row from now on (a capacity check's query may predate it)
            self._reserved.pop(sb.id, None)
        return sb

    async def _within_user_limit(self, user_id: str | None) -> None:
        """A quick refusal, before any work, of a user whose rows (every replica's) are at the
        limit already. The exact count is the one made with the row's insert or claim
        (records.within_user_limit), which one user's creates through all replicas take in
        turn; this one never refuses what that one would let through."""
        cap = self.settings.max_sandboxes_per_user
        if user_id is None or not cap:
            return
        async with self.sessions() as db:
            held = await db.scalar(select(func.count()).select_from(Sandbox).where(
                Sandbox.user_id == user_id, Sandbox.state.in_([s.value for s in LIVE])))
        if held >= cap:
            raise UserLimit(cap)

    async def _reserve(self, recipe: recipes.Recipe, spec: CreateSpec) -> KubeSandbox:
        """Refuse at once what the cluster cannot hold, counting every replica's sandboxes
        (their rows) and this one's creates whose row is not written yet; the scheduler has
        the last word (a pod it cannot place is refused the same way)."""
        cpu, mem = await self._cluster_allocatable()
        async with self.sessions() as db:
            held = {sid: (v, f, m) for sid, v, f, m in (await db.execute(
                select(Sandbox.id, Sandbox.vcpu, Sandbox.cpu_fraction, Sandbox.memory_mib)
                .where(Sandbox.state.in_([s.value for s in LIVE])))).all()}
        for s in self._reserved.values():  # this replica's creates, whether or not in the rows
            held[s.id] = (s.vcpu, s.cpu_fraction, s.memory_mib)
        if len(held) >= self.settings.max_sandboxes:
            raise NoCapacity(f"this e2a runs its maximum of {self.settings.max_sandboxes} "
                             "sandboxes")
        ratios = self.settings.kube_cpu_request_ratio, self.settings.kube_memory_request_ratio
        used = [manifests.requests(*h, *ratios) for h in held.values()]
        used.append(manifests.requests(recipe.vcpu, recipe.cpu_fraction, recipe.memory_mib,
                                       *ratios))
        extra_cpu, extra_mem = self.runtime.overhead  # per pod, as the scheduler counts it
        if (sum(c + extra_cpu for c, _ in used) > cpu
                or sum(m + extra_mem for _, m in used) > mem):
            raise NoCapacity("the cluster has no room for another sandbox of this size")
        now = utcnow()
        sid = new_id("sbx")
        sb = KubeSandbox(
            id=sid, user_id=spec.user_id, template=recipe.name, vcpu=recipe.vcpu,
            cpu_fraction=recipe.cpu_fraction, memory_mib=recipe.memory_mib,
            internet=spec.internet, metadata=spec.metadata, idle_timeout=spec.idle_timeout,
            max_lifetime=spec.max_lifetime, created_at=now,
            expires_at=now + timedelta(seconds=spec.max_lifetime), token=self.keys.token(sid))
        self.sandboxes[sid] = self._reserved[sid] = sb
        return sb

    def _not_gvisor(self, runtime: kc.Runtime) -> str | None:
        """Why the RuntimeClass is not one to run sandboxes in, or None."""
        allowed = self.settings.kube_runtime_handlers
        if runtime.handler in allowed:
            return None
        return (f"the RuntimeClass {self.settings.kube_runtime_class!r} runs the handler "
                f"{runtime.handler!r}, which is not gVisor (E2A_KUBE_RUNTIME_HANDLERS: "
                f"{', '.join(allowed)}): sandboxes would share the node's kernel")

    async def _cluster_allocatable(self) -> tuple[int, int]:
        """The allocatable CPU and memory of the nodes sandboxes may go to, listed at most
        every ALLOCATABLE_TTL (the RuntimeClass read again with them: its scheduling may
        change). Unavailable (503) while the RuntimeClass is gone: the API server would
        refuse every pod of it, after a workspace was mounted."""
        now = time.monotonic()
        if self._allocatable is None or now - self._allocatable[0] > ALLOCATABLE_TTL:
            name = self.settings.kube_runtime_class
            runtime = await self.cluster.runtime(name)
            if runtime is None:
                self._allocatable = None
                log.error("the RuntimeClass %s is gone: no sandbox can start", name)
                raise Unavailable(f"the cluster has no RuntimeClass {name!r} any more "
                                  "(E2A_KUBE_RUNTIME_CLASS): no sandbox can start")
            if (wrong := self._not_gvisor(runtime)) is not None:
                self._allocatable = None
                log.error("%s: no sandbox starts", wrong)
                raise Unavailable(f"{wrong}: no sandbox can start")
            self.runtime = runtime
            self._allocatable = (now, await self.cluster.allocatable(runtime))
        return self._allocatable[1]

    def _row(self, sb: KubeSandbox, env_vars: dict[str, str]) -> Sandbox:
        return Sandbox(
            id=sb.id, user_id=sb.user_id, template=sb.template, state=State.CREATING.value,
            vcpu=sb.vcpu, cpu_fraction=sb.cpu_fraction, memory_mib=sb.memory_mib,
            internet=sb.internet, metadata_=sb.metadata, env_vars=env_vars,
            idle_timeout_seconds=sb.idle_timeout, max_lifetime_seconds=sb.max_lifetime,
            slot=None, envd_token="", created_at=sb.created_at, expires_at=sb.expires_at,
            replica=self.replica.key, active_at=sb.created_at, workspace_id=sb.workspace_id)

    def _plan(self, sb: KubeSandbox, recipe: recipes.Recipe, params: dict[str, str]
              ) -> manifests.PodPlan:
        s = self.settings
        env = sandbox_env(recipe, {**params, **{
            name: self.keys.secret(name, sb.id, SECRET_LENGTH) for name in recipe.secrets}})
        return manifests.PodPlan(
            sandbox_id=sb.id, instance=s.instance, template=recipe.name, user_id=sb.user_id,
            image=images.ref(s, recipe), vcpu=recipe.vcpu, cpu_fraction=recipe.cpu_fraction,
            memory_mib=recipe.memory_mib, disk_mib=recipe.disk_mib, internet=sb.internet,
            envd_token=sb.token, env=env, runtime_class=s.kube_runtime_class,
            cpu_request_ratio=s.kube_cpu_request_ratio,
            memory_request_ratio=s.kube_memory_request_ratio, nameservers=self._nameservers(),
            api_cidrs=s.kube_api_cidrs, api_namespace=self.api_namespace,
            egress_port=s.egress_port if s.kube_egress_host else None,
            egress_host=s.kube_egress_host or None, non_root=s.kube_non_root,
            writable=self._writable(recipe))

    async def _mount_workspace(self, sb: KubeSandbox, plan: manifests.PodPlan) -> None:
        """Place the pod on a node and have that node's agent mount the workspace there: the
        pod binds the mount as /home/user (a new workspace is seeded from the image's first)."""
        ws = sb.workspace
        try:
            node = await self.mounts.place(sb.id, *node_mounts.pod_requests(plan),
                                           self.runtime)
        except node_mounts.MountFailed as exc:
            raise NoCapacity(str(exc)) from exc
        plan.node, plan.seed_home = node.name, ws.fresh
        # before the mount: where its teardown uploads it, and every replica limits it
        await self.records.set_node(sb.id, node.name)
        await self.workspaces.bind(ws, sb.id, node.name)
        sb.node_name = node.name
        plan.home = await self.mounts.mount(node, sb.id, ws.workspace_id, ws.limit())
        ws.node = node_mounts.AgentCache(self.mounts, node.name, sb.id)
        await self.workspaces.mounted(ws)  # its limit follows the share from now on
        self.hostlog.write(sb.id, f"workspace {ws.workspace_id} mounted on node {node.name}")

    async def _move(self, sb: KubeSandbox, new: State, reason: str | None = None,
                    detail: str | None = None, **values) -> None:
        """Every move names the replica that makes it: the one working on the sandbox."""
        await super()._move(sb, new, reason, detail, replica=self.replica.key, **values)

    async def _boot(self, sb: KubeSandbox, recipe: recipes.Recipe, spec: CreateSpec) -> None:
        t0 = time.perf_counter()
        ns = self.settings.kube_namespace
        async with sb.lock:
            try:
                self.hostlog.write(sb.id, f"creating from template {sb.template}")
                await self._move(sb, State.CONFIGURING)
                plan = self._plan(sb, recipe, spec.params)
                if sb.workspace is not None:
                    await self._mount_workspace(sb, plan)
                await self.cluster.create(manifests.secret(plan))
                await self.cluster.create(manifests.network_policy(plan, ns))
                await self._move(sb, State.BOOTING)
                await self.cluster.create(manifests.pod(plan, ns))
                try:
                    sb.ip = await self.cluster.wait_running(plan.name, POD_START_TIMEOUT)
                except kc.Unschedulable as exc:
                    raise NoCapacity(f"the cluster has no room for it: {exc}") from exc
                self.mounts.placed(sb.id)  # (held until now: a pod just made may be listed
                #                             by neither the pods' list nor the placements)
                await envd.wait_ready(self.http, sb.ip, sb.token, deadline_s=30)
                if recipe.services:
                    await envd.wait_services(self.http, sb.ip, sb.token, recipe.ready_timeout)
                if spec.env_vars:
                    await self._init_env(sb, spec.env_vars)
                await self._move(sb, State.RUNNING, "booted",
                                 f"{1000 * (time.perf_counter() - t0):.0f} ms")
                self.hostlog.write(sb.id, f"running (pod {plan.name}, ip {sb.ip})")
            except BaseException as exc:
                self.mounts.placed(sb.id)  # (a placement its failure left held)
                reason = sb.end_reason or EndReason.CREATE_FAILED
                detail = "deleted during create" if isinstance(exc, asyncio.CancelledError) \
                    else f"create failed: {exc}"
                if not isinstance(exc, asyncio.CancelledError):
                    log.warning("create %s failed: %s", sb.id, exc)
                await uninterrupted(self._stop(sb, reason, detail))
                if sb.state is not State.DESTROYED and sb.id not in self.stuck:
                    # superseded: another replica tore it down, maybe before this boot made
                    # its objects; they go now (deleting is idempotent)
                    await uninterrupted(self._delete_quietly(sb.name))
                raise

    async def _delete_quietly(self, name: str) -> None:
        try:
            await self.cluster.delete_sandbox(name)
        except Exception as exc:  # the leader's sweep deletes pods no live row claims
            log.warning("deleting %s failed: %s", name, exc)

    async def _init_env(self, sb: KubeSandbox, env_vars: dict[str, str]) -> None:
        async with envd.request(self.http, sb.ip, sb.token, "POST", "/init",
                                json={"env": env_vars}) as r:
            r.raise_for_status()

    # ---- the warm pool: pods started ahead, claimed by a label change -----------------------

    def _pool_target(self, template: str) -> int:
        """Only what the settings ask (E2A_POOL_SIZE, E2A_POOL_SIZES), not the recipes'
        defaults: each pooled pod holds cluster resources, and a template's image may not be
        in the registry at all."""
        return self.settings.pool_size_of(template, 0) if recipes.load(template) else 0

    async def _pooled(self, template: str | None = None, limit: int | None = None
                      ) -> list[Sandbox]:
        """Running sandboxes nobody claimed yet (every replica's), oldest first."""
        q = select(Sandbox).where(Sandbox.user_id.is_(None),
                                  Sandbox.state == State.RUNNING.value)
        if template is not None:
            q = q.where(Sandbox.template == template)
        async with self.sessions() as db:
            return list((await db.execute(q.order_by(Sandbox.created_at).limit(limit)))
                        .scalars().all())

    async def _claim_from_pool(self, recipe: recipes.Recipe,
                               spec: CreateSpec) -> SandboxRecord | None:
        """A warm sandbox of the template for this user: its row claimed in one conditional
        UPDATE (one replica wins each), then its pod's labels and policy changed."""
        if spec.workspace is not None or not self._pool_target(recipe.name):
            return None
        if spec.params and any(recipe.params.get(k) != v for k, v in spec.params.items()):
            return None  # pooled sandboxes run the template's defaults
        for row in await self._pooled(recipe.name, POOL_CLAIM_TRIES):
            now = utcnow()
            expires = now + timedelta(seconds=spec.max_lifetime)
            if not await self.records.claim(
                    row.id, spec.user_id, spec.metadata,
                    user_cap=self.settings.max_sandboxes_per_user, replica=self.replica.key,
                    internet=spec.internet,
                    env_vars=spec.env_vars, idle_timeout_seconds=spec.idle_timeout,
                    max_lifetime_seconds=spec.max_lifetime, created_at=now, expires_at=expires,
                    active_at=now):
                continue  # another replica's create took it
            # /health's count, right at once here (and within a second on the other replicas)
            self._pool_counts[recipe.name] = max(0, self._pool_counts.get(recipe.name, 0) - 1)
            ip = None
            if row.id not in self.sandboxes:
                try:
                    ip = await self.cluster.pod_ip(manifests.pod_name(row.id))
                except Exception as exc:  # claimed, so ended below (not left claimed, unused)
                    log.warning("warm sandbox %s: its pod's address: %s", row.id, exc)
            sb = self.sandboxes.get(row.id) or self._adopt(row, ip)
            async with sb.lock:
                sb.user_id, sb.metadata, sb.internet = spec.user_id, spec.metadata, spec.internet
                sb.idle_timeout, sb.max_lifetime = spec.idle_timeout, spec.max_lifetime
                sb.created_at, sb.expires_at = now, expires
                sb.touch()
                try:
                    if sb.state is not State.RUNNING or not sb.ip:
                        raise RuntimeError("its pod is not running")
                    plan = self._plan(sb, recipe, {})
                    await self.cluster.claim(
                        plan.name, {manifests.OWNER: plan.labels[manifests.OWNER]},
                        manifests.network_policy(plan, self.settings.kube_namespace))
                    if spec.env_vars:
                        await self._init_env(sb, spec.env_vars)
                except Exception as exc:
                    log.warning("warm sandbox %s unusable: %s", sb.id, exc)
                    await self._stop(sb, EndReason.CRASHED, f"warm pool claim failed: {exc}")
                    continue
            self.hostlog.write(sb.id, f"handed out from the warm pool to {spec.user_id}")
            return sb.record(self.node)
        return None

    async def _pool_filler(self) -> None:
        """The leader keeps each template's pool of pods started and waiting; every replica
        counts it (for /health)."""
        retry_at: dict[str, float] = {}
        fails: dict[str, int] = {}
        while True:
            await asyncio.sleep(1.0)
            try:
                pooled: dict[str, list[Sandbox]] = {}
                for row in await self._pooled():
                    pooled.setdefault(row.template, []).append(row)
                counts = {name: len(rows) for name, rows in pooled.items()}
                self._pool_counts = counts
                if not self.replica.leading:
                    continue
                await self._trim_pool(pooled)
                for name in recipes.available():
                    missing = self._pool_target(name) - counts.get(name, 0)
                    if missing > 0 and time.monotonic() >= retry_at.get(name, 0.0):
                        try:
                            await self._refill(name, missing)
                            fails.pop(name, None)
                        except Exception as exc:  # this template's, not the others' refill
                            fails[name] = fails.get(name, 0) + 1
                            wait = min(300, 5 * 2 ** (fails[name] - 1))  # an image missing
                            log.error("warm pool refill of %s failed (again in %d s): %s",
                                      name, wait, exc)
                            retry_at[name] = time.monotonic() + wait
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("warm pool refill failed: %s", exc)
                await asyncio.sleep(5)

    async def _trim_pool(self, pooled: dict[str, list[Sandbox]]) -> None:
        """Pooled sandboxes past their lifetime, or beyond what the settings now ask."""
        now = utcnow()
        for name, rows in pooled.items():
            extra = len(rows) - self._pool_target(name)
            for i, row in enumerate(rows):  # oldest first
                if now >= aware(row.expires_at):
                    await self._unpool(row, EndReason.MAX_LIFETIME, "warm, never claimed")
                elif i < extra:
                    await self._unpool(row, EndReason.DELETED, "the warm pool is smaller now")

    async def _unpool(self, row: Sandbox, reason: EndReason, detail: str) -> None:
        """End a pooled sandbox, unless a create claims it first: the move to `stopping` is
        conditional on its having no owner (a claim sets one in its own conditional UPDATE)."""
        if not await self.records.transition(
                row.id, State.RUNNING, State.STOPPING, reason.value, detail,
                only_from=State.RUNNING, unclaimed=True, end_reason=reason.value,
                replica=self.replica.key):
            return
        sb = self._adopt(row)
        async with sb.lock:
            sb.state, sb.end_reason = State.STOPPING, reason
            await self._stop(sb, reason, detail)
        self._pool_counts[row.template] = max(0, self._pool_counts.get(row.template, 0) - 1)

    async def _refill(self, name: str, missing: int) -> None:
        recipe = recipes.load(name)
        for _ in range(missing):
            sb = await self._launch(recipe, CreateSpec(
                user_id=None, template=name, idle_timeout=POOL_LIFETIME,
                max_lifetime=POOL_LIFETIME, internet=False))
            try:  # bash and its libraries loaded: ~10 ms off the first command
                async with envd.request(self.http, sb.ip, sb.token, "POST", "/commands",
                                        json={"cmd": "true"}, timeout=30) as r:
                    await r.read()
            except Exception as exc:  # never left running outside the pool
                await self.destroy(sb.id, EndReason.CRASHED,
                                   f"warm-up of a pooled sandbox failed: {exc}")
                raise
            self._pool_counts[name] = self._pool_counts.get(name, 0) + 1

    # ---- destroy ---------------------------------------------------------------------------

    async def destroy(self, sandbox_id: str, reason: EndReason, detail: str | None = None) -> None:
        if sandbox_id not in self.sandboxes:
            await self._take_over(sandbox_id)
        await super().destroy(sandbox_id, reason, detail)

    async def _take_over(self, sandbox_id: str) -> None:
        """Before ending a sandbox this process does not know: wait while a live replica
        creates it or tears it down; know it once it runs, or once its replica is gone (a
        teardown can always be done again)."""
        deadline = time.monotonic() + POD_START_TIMEOUT + GONE_TIMEOUT
        while sandbox_id not in self.sandboxes:
            row = await self.records.get(sandbox_id)
            if row is None or row.state == State.DESTROYED.value:
                return
            if (row.state == State.RUNNING.value or time.monotonic() > deadline
                    or row.replica == self.replica.key  # this replica's, no longer in hand
                    or await self.replica.gone(row.replica)):
                self._adopt(row)
                return
            await asyncio.sleep(0.2)

    async def _stop(self, sb: KubeSandbox, reason: EndReason, detail: str | None = None) -> None:
        """The teardown (Lifecycle.destroy calls it, holding `sb.lock`): the pod, its policy
        and its secret deleted, and the pod waited for until it is gone."""
        said = await self._stopping(sb, reason, detail)
        if said is None:
            return
        reason, detail = said
        try:
            await self.cluster.delete_sandbox(sb.name)
            deadline = time.monotonic() + GONE_TIMEOUT
            while not await self.cluster.gone(sb.name):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pod {sb.name} still there {GONE_TIMEOUT:.0f} s after "
                                       "its delete")
                await asyncio.sleep(0.1)
            if sb.node_name is not None:  # every file uploaded before it is destroyed
                await self.mounts.release(sb.id, sb.node_name)
        except Exception as exc:
            self.stuck.add(sb.id)
            self.hostlog.write(sb.id, f"teardown incomplete, retrying: {exc}")
            return
        self._unstuck(sb)
        self._flushed.pop(sb.id, None)
        # counted again now that all is in S3; then its lease ends (made here, mounted or
        # not; or by another replica, found by the sandbox)
        if sb.workspace_id is not None:
            await self.workspaces.mark_ended(sb.id, sb.workspace)
        if sb.workspace is not None:
            self._in_background(self.workspaces.ended(sb.workspace))
        elif sb.workspace_id is not None:
            self._in_background(self.workspaces.sandbox_gone(sb.id, sb.workspace_id,
                                                             sb.user_id))
        await self._destroyed(sb, reason, detail)
        # forgotten once recorded (capacity is counted from the rows on this backend); if
        # the record failed, the row names this replica and its sweep tears it down again
        if self.sandboxes.get(sb.id) is sb:
            del self.sandboxes[sb.id]

    async def _let_go(self, sb: KubeSandbox, reason: EndReason) -> None:
        await super()._let_go(sb, reason)
        if sb.workspace is not None:  # the replica tearing it down ends its lease
            self.workspaces.forget(sb.workspace)

    # ---- pause and fork: not on this backend ----------------------------------------------

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        raise WrongState("pause is not available on the Kubernetes backend: the container "
                         "runtime interface has no checkpoint and restore of a running pod "
                         "(docs/kubernetes.md)", "running")

    async def resume(self, sandbox_id: str, wake: bool = False) -> SandboxRecord:
        raise WrongState("resume is not available on the Kubernetes backend "
                         "(docs/kubernetes.md)", "running")

    async def fork(self, sandbox_id: str, count: int) -> list[SandboxRecord]:
        raise WrongState("fork is not available on the Kubernetes backend "
                         "(docs/kubernetes.md)", "running")

    # ---- death, idle and lifetime ------------------------------------------------------------

    async def _watch_deaths(self) -> None:
        async for op, pod in self.cluster.events():
            try:
                await self._pod_changed(op, pod)
            except Exception as exc:  # one odd event must not end the watch
                log.error("pod watch: %s", exc)

    async def _pod_changed(self, op: str, pod) -> None:
        """A pod that stopped running ends its sandbox: each replica that knows the sandbox
        acts (the first to move its row does the teardown, the others let go), and the
        leader also for one no replica knows."""
        sid = manifests.sandbox_of((pod.metadata.labels or {}).get(manifests.SANDBOX, ""))
        end = None if op == "DELETED" else kc.ended(pod)
        if op != "DELETED" and end is None:
            return
        sb = self.sandboxes.get(sid)
        if sb is None:
            row = await self.records.get(sid) if self.replica.leading else None
            if row is None or row.state != State.RUNNING.value:
                return
            sb = self._adopt(row)
        if sb.state is not State.RUNNING:
            return
        if end is None:
            self._in_background(self.destroy(sid, EndReason.CRASHED, "its pod was deleted"))
        else:
            log.warning("sandbox %s died: %s", sid, end.detail)
            self._in_background(self.destroy(
                sid, EndReason.OUT_OF_MEMORY if end.oom else EndReason.CRASHED, end.detail))

    async def _flush_activity(self) -> None:
        """Write when calls last went into the sandboxes used through this replica, so the
        leader's idle timeout counts every replica's traffic (and open streams keep a
        sandbox alive, wherever they are)."""
        while True:
            await asyncio.sleep(ACTIVITY_FLUSH)
            used = [sb.id for sb in self.sandboxes.values() if sb.state is State.RUNNING
                    and (sb.in_use or sb.last_activity > self._flushed.get(sb.id, 0.0))]
            if not used:
                continue
            now = time.monotonic()
            try:
                await self.records.active(used, utcnow())
                self._flushed.update((sid, now) for sid in used)
            except Exception as exc:
                log.warning("recording activity failed (tried again): %s", exc)

    async def _running_commands(self, sb: KubeSandbox) -> int:
        data = await envd.get_json(self.http, envd.base_url(sb.ip) + "/commands", sb.token)
        return len(data.get("commands", [])) if data else 0

    async def _reap_once(self) -> None:
        now = time.monotonic()
        for sb in list(self.sandboxes.values()):  # this replica's failed teardowns, again
            self._retry_if_stuck(sb, now)
        if not self.replica.leading:
            return
        if now - self._swept_at >= SWEEP_EVERY:
            await self._sweep(restart=False)
        now_wall, now = utcnow(), time.monotonic()
        for row in await self.records.running_owned():
            if now_wall >= aware(row.expires_at):
                await self.destroy(row.id, EndReason.MAX_LIFETIME)
                continue
            sb = self.sandboxes.get(row.id)
            # another replica's use shows in the row a flush later, by its own clock
            idle = (now_wall - aware(row.active_at or row.created_at)).total_seconds() \
                - ACTIVITY_FLUSH - CLOCK_SLACK
            if sb is not None:
                if sb.in_use:
                    continue
                idle = min(idle, now - sb.last_activity)
            if idle < row.idle_timeout_seconds:
                continue
            await self._find(row.id)
            sb = self.sandboxes.get(row.id)
            if sb is not None and sb.ip and await self._running_commands(sb):
                sb.touch()
            else:
                await self.destroy(row.id, EndReason.IDLE_TIMEOUT)

    # ---- reconciliation --------------------------------------------------------------------

    def _stale(self, row: Sandbox, pod) -> bool:
        """A pooled pod that is not what its template's pod is now: another image (a rebuilt
        template, or envd after an upgrade of e2a), or another shape (E2A_KUBE_NON_ROOT,
        E2A_KUBE_READ_ONLY_ROOT or the recipe's writable paths changed): not handed out."""
        recipe = recipes.load(row.template)
        if recipe is None:
            return True
        container = pod.spec.containers[0]
        security = container.securityContext
        writable = self._writable(recipe)
        shape = (bool(security and security.runAsNonRoot),
                 bool(security and security.readOnlyRootFilesystem),
                 {m.mountPath for m in container.volumeMounts or [] if m.name == "writable"})
        if shape != (self.settings.kube_non_root, writable is not None,
                     set(manifests.writable_paths(writable, False)) if writable is not None
                     else set()):  # (a pooled pod has no workspace)
            return True
        try:
            return container.image != images.ref(self.settings, recipe)
        except OSError:  # no envd to hash here: nothing to compare with
            return False

    async def _half_claimed(self, row: Sandbox, pod) -> bool:
        """A warm sandbox whose row a replica claimed (and names it) but whose pod still
        carries the pool's label: that replica died before handing it out. Its user never got
        the answer; left alone, the sandbox would be billed to them until its idle timeout.
        The sweep's lists may be seconds old: the row and the pod are read again before it
        says so."""
        def pooled(p) -> bool:
            return (p.metadata.labels or {}).get(manifests.OWNER) == manifests.POOL_OWNER
        if not (row.user_id is not None and pooled(pod) and row.replica != self.replica.key
                and await self.replica.gone(row.replica)):
            return False
        now = await self.records.get(row.id)
        if now is None or (now.state, now.user_id, now.replica) != (
                State.RUNNING.value, row.user_id, row.replica):
            return False
        fresh = await self.cluster.pod(manifests.pod_name(row.id))
        return fresh is not None and pooled(fresh)

    async def _sweep(self, restart: bool) -> None:
        """The leader's look at every row and pod of this instance: a running sandbox whose
        pod is gone ends (`server_restart` in the sweep that starts a lead, when no e2a may
        have watched); a create or teardown whose replica died is finished; a pod no live row
        claims is deleted. Sandboxes that run are left as they are (known when first used)."""
        self._swept_at = time.monotonic()
        pods = {p.metadata.name: p for p in await self.cluster.pods()}
        for row in await self.records.live_rows():
            pod = pods.pop(manifests.pod_name(row.id), None)
            if row.state == State.RUNNING.value:
                if pod is not None and kc.running_ip_or_none(pod):
                    if row.user_id is None and self._stale(row, pod):
                        await self._unpool(row, EndReason.DELETED,
                                           "warm, of an image or a shape no longer the "
                                           "template's")
                    elif await self._half_claimed(row, pod):
                        await self.destroy(row.id, EndReason.SERVER_RESTART,
                                           "its e2a stopped during its claim from the warm pool")
                    continue
                if pod is None and await self.cluster.pod_ip(manifests.pod_name(row.id)):
                    continue  # its create ended between the two lists
                reason = EndReason.SERVER_RESTART if restart else EndReason.CRASHED
                await self.destroy(row.id, reason, "not running when e2a restarted: its pod "
                                   "had ended" if restart else "its pod had ended")
            elif (State(row.state) in BOOTING or row.state == State.STOPPING.value) \
                    and row.id not in self.sandboxes \
                    and (row.replica == self.replica.key  # its record failed here: again
                         or await self.replica.gone(row.replica)):
                sb = self._adopt(row)
                async with sb.lock:
                    await self._stop(sb, sb.end_reason or EndReason.SERVER_RESTART,
                                     f"its e2a stopped during its {row.state}")
        for name in pods:  # no live row of this instance claims it
            log.info("removing pod %s: no sandbox of this e2a", name)
            await self.cluster.delete_sandbox(name)
        if self.mounts.enabled:
            await self._sweep_mounts()
            await self.workspaces.sweep(self.replica.gone, self._releasing)

    async def _sweep_mounts(self) -> None:
        """A workspace mount left on a node by a sandbox no longer live (its e2a died between
        the mount and the row's end): uploaded and removed, in the background (an upload may
        take minutes; the reaper does not wait). The rows are read after the mounts, and a
        row goes in before its mount is made, so a create under way is never taken for one.
        A mount is taken for dead only if its sandbox ran before the listing began (its
        mount had started then): one listed while starting is not alive yet."""
        ran = {row.id for row in await self.records.live_rows()
               if row.state == State.RUNNING.value}
        mounted = await self.mounts.mounted()
        rows = {row.id: row for row in await self.records.live_rows()}
        for node, mounts in mounted.items():
            for sid, alive in mounts.items():
                row = rows.get(sid)
                if sid in ran and row is not None and row.state == State.RUNNING.value \
                        and not alive:
                    # its rclone died (the agent's node restarted it, say): the home is gone
                    # from under the sandbox; its teardown uploads what the cache holds
                    self._in_background(self.destroy(sid, EndReason.CRASHED,
                                                     "its workspace mount died"))
                if row is not None or sid in self.sandboxes or sid in self._releasing:
                    continue
                log.info("releasing the workspace mount of %s on node %s: no live sandbox",
                         sid, node)
                self._releasing.add(sid)
                self._in_background(self._release_leftover(sid, node))

    async def _release_leftover(self, sandbox_id: str, node: str) -> None:
        try:
            await self.mounts.release(sandbox_id, node)
        except node_mounts.MountFailed as exc:
            log.warning("releasing the mount of %s failed, retried: %s", sandbox_id, exc)
        finally:
            self._releasing.discard(sandbox_id)

    # ---- connections into a sandbox --------------------------------------------------------

    def _running(self, sandbox_id: str) -> KubeSandbox:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.state is not State.RUNNING or not sb.ip:
            raise NotRunning(sandbox_id, sb.state.value if sb else "not running")
        sb.touch()
        return sb

    def _address(self, sb: KubeSandbox) -> str:
        return sb.ip or ""

    def _token(self, sb: KubeSandbox) -> str:
        return sb.token

    def _agent_failed(self, sb: KubeSandbox, exc: BaseException) -> None:
        self._in_background(self._probe(sb))

    async def _probe(self, sb: KubeSandbox) -> None:
        """A request into the sandbox failed on its side: if its pod is no longer running,
        it died (the watch may not have said so yet)."""
        if sb.state is State.RUNNING and await self.cluster.pod_ip(sb.name) is None:
            await self.destroy(sb.id, EndReason.CRASHED, "its pod stopped running")
