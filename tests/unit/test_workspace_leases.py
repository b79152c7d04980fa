"""Workspaces' leases as rows (e2a/workspaces/service.py), over a real store: two replicas on one
PostgreSQL share one user's quota among all their mounts (before, each shared it among its own,
and two mounts made through two replicas could together fill twice it), a delete through one
replica and a create through another never both go through, and the leader's sweep ends the
leases a dead replica left."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from e2a.config import Settings
from e2a.sandboxes.records import utcnow
from e2a.store.models import Sandbox, Workspace, WorkspaceLease
from e2a.workspaces.registry import cache_limit
from e2a.workspaces.s3 import Usage
from e2a.workspaces.scope import Scope
from e2a.workspaces.service import MountPlan, WorkspaceBusy, Workspaces
from tests.unit import stores

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
QUOTA_MIB = 64


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Agent:
    """The node agents of the cluster as the replicas see them: each mount's cache (bytes
    written, limit), by sandbox."""

    def __init__(self) -> None:
        self.written: dict[str, int] = {}
        self.limits: dict[str, int] = {}

    def cache(self, sandbox_id: str, node: str) -> "Cache":
        assert node == "node-1"
        return Cache(self, sandbox_id)


class Cache:
    def __init__(self, agent: Agent, sandbox_id: str) -> None:
        self.agent, self.sandbox_id = agent, sandbox_id

    async def set_limit(self, limit: int) -> None:
        self.agent.limits[self.sandbox_id] = limit

    async def allocated(self) -> int:
        return self.agent.written.get(self.sandbox_id, 0)


class Store:
    """S3 as the leases use it: counts, and a delete that takes a moment (a create through
    another replica runs meanwhile)."""

    def __init__(self) -> None:
        self.deleted: list[str] = []

    def usage(self, workspace_id: str) -> Usage:
        return Usage(0, 0)

    def delete_all(self, workspace_id: str) -> None:
        time.sleep(0.05)
        self.deleted.append(workspace_id)


def replica(sessions, tmp_path, key: int, agent: Agent, store: Store) -> Workspaces:
    ws = Workspaces(Settings(data_dir=tmp_path, backend="kubernetes",
                             workspace_quota_mib=QUOTA_MIB), sessions)
    ws._endpoint, ws._store = "fake", store
    ws.replica, ws.remote_cache = key, agent.cache
    return ws


async def mount(ws: Workspaces, agent: Agent, user: str, name: str, sandbox_id: str):
    """A create's workspace steps as the Kubernetes backend takes them (kube/host.py)."""
    plan = await ws.plan(Scope(user, app_id=name))
    await ws.bind(plan, sandbox_id, "node-1")
    agent.limits[sandbox_id] = plan.limit()  # the agent mounts with the planned limit
    plan.node = agent.cache(sandbox_id, "node-1")
    await ws.mounted(plan)
    return plan


async def test_mounts_through_two_replicas_share_one_quota(tmp_path):
    engine, sessions, (user, _) = await stores.either("postgresql", tmp_path, "ws_share")
    try:
        agent, store = Agent(), Store()
        one, two = (replica(sessions, tmp_path, k, agent, store) for k in (1, 2))
        first = await mount(one, agent, user, "first", "sbx_one")
        assert first.grant == QUOTA_MIB * MiB
        agent.written["sbx_one"] = 40 * MiB  # the first sandbox fills 40 MiB of its cache

        second = await mount(two, agent, user, "second", "sbx_two")
        # what is left (24 MiB) shared between the two: not the whole quota again
        assert second.grant == 12 * MiB
        assert agent.limits["sbx_two"] == cache_limit(0, 12 * MiB)
        # ... and the first replica's mount limited through its agent by the second replica
        assert agent.limits["sbx_one"] == cache_limit(0, 52 * MiB)
        assert agent.limits["sbx_one"] + agent.limits["sbx_two"] \
            <= cache_limit(0, QUOTA_MIB * MiB) + cache_limit(0, 0)

        # the first sandbox ends through the second replica: its lease, the first's, ends
        await two.sandbox_gone("sbx_one", first.workspace_id, user)
        assert await leases(sessions) == 1
        await one.free_quota(user)
        assert first.lease not in one.leases  # forgotten where it was made too
        assert agent.limits["sbx_two"] == cache_limit(0, QUOTA_MIB * MiB)
    finally:
        await engine.dispose()


async def test_a_delete_and_a_create_through_two_replicas_never_both_go_through(tmp_path):
    engine, sessions, (user, _) = await stores.either("postgresql", tmp_path, "ws_delete")
    try:
        agent, store = Agent(), Store()
        one = replica(sessions, tmp_path, 1, agent, store)
        outcomes = set()
        # the second replica reads the workspace, then is slow to write its lease: the delete
        # runs in that gap (or, the other way round, before the create begins)
        two = replica(slow_gets(sessions, 0.1), tmp_path, 2, agent, store)

        async def later(step, delay: float):
            await asyncio.sleep(delay)
            return await step

        for i, (delete_after, plan_after) in enumerate([(0.03, 0), (0, 0.2)] * 3):
            scope = Scope(user, app_id=f"race{i}")
            row, _ = await one.registry.find_or_make(scope)
            deleted, planned = await asyncio.gather(
                later(one.delete(row.id, user), delete_after), later(two.plan(scope), plan_after),
                return_exceptions=True)
            assert deleted is None or isinstance(deleted, WorkspaceBusy), deleted
            assert isinstance(planned, (MountPlan, WorkspaceBusy)), planned
            if isinstance(planned, WorkspaceBusy):
                assert deleted is None
                outcomes.add("deleted")
            else:
                # leased: the workspace it leased is there, and a delete did not go through
                # on it (or went through before the lease, which then made a new one)
                async with sessions() as db:
                    assert await db.get(Workspace, planned.workspace_id) is not None
                if planned.workspace_id == row.id:
                    assert isinstance(deleted, WorkspaceBusy)
                    assert row.id not in store.deleted
                    outcomes.add("leased")
                else:
                    assert deleted is None
                    outcomes.add("deleted, then made again")
                await two.release(planned)
        # every lease on a workspace that is there
        async with sessions() as db:
            orphans = await db.scalar(select(func.count()).select_from(WorkspaceLease).where(
                ~WorkspaceLease.workspace_id.in_(select(Workspace.id))))
        assert orphans == 0
        # the create in the delete's gap waited for it and leased first; the other order
        # (how far the delete got when the create began depends on the machine's load)
        assert "leased" in outcomes and outcomes - {"leased"}
    finally:
        await engine.dispose()


async def test_a_workspace_being_deleted_is_not_leased(tmp_path):
    engine, sessions, (user, _) = await stores.migrated(stores.sqlite_url(tmp_path))
    try:
        ws = replica(sessions, tmp_path, 1, Agent(), Store())
        row, _ = await ws.registry.find_or_make(Scope(user))
        async with sessions() as db:
            (await db.get(Workspace, row.id)).deleting_at = utcnow()
            await db.commit()
        with pytest.raises(WorkspaceBusy, match="being deleted"):
            await ws.plan(Scope(user))
        with pytest.raises(WorkspaceBusy, match="being deleted"):
            await ws.delete(row.id, user)
        async with sessions() as db:  # a mark left by a replica that died long ago
            (await db.get(Workspace, row.id)).deleting_at = utcnow() - timedelta(hours=1)
            await db.commit()
        plan = await ws.plan(Scope(user))
        with pytest.raises(WorkspaceBusy, match="mounted by a sandbox"):
            await ws.delete(row.id, user)
        await ws.release(plan)
        await ws.delete(row.id, user)
        assert ws.store.deleted == [row.id] and await leases(sessions) == 0
    finally:
        await engine.dispose()


async def test_a_destroyed_sandboxs_workspace_may_be_deleted_at_once(tmp_path):
    """The teardown marks its lease ended before `destroyed` is answered (a DELETE of the
    workspace right after is not refused); the lease holds its share until the count."""
    engine, sessions, (user, _) = await stores.migrated(stores.sqlite_url(tmp_path))
    try:
        ws = replica(sessions, tmp_path, None, Agent(), Store())
        plan = await ws.plan(Scope(user))
        assert await ws.in_use([plan.workspace_id]) == {plan.workspace_id}
        await ws.mark_ended("sbx_gone", plan)
        assert await ws.in_use([plan.workspace_id]) == set()
        assert await leases(sessions) == 1  # counted in the share until `ended`
        await ws.ended(plan)
        assert await leases(sessions) == 0
        await ws.delete(plan.workspace_id, user)
    finally:
        await engine.dispose()


async def test_a_lease_made_while_a_share_runs_keeps_its_grant(tmp_path):
    """A share reads the leases, then a create's lease goes in before the share is done: the
    share must not take the new lease for one ended elsewhere and forget it (the create's own
    share then sized a copy, and its mount got no share of the quota at all)."""
    engine, sessions, (user, _) = await stores.migrated(stores.sqlite_url(tmp_path))
    try:
        gate = Gate()
        ws = replica(gate.on(sessions), tmp_path, None, Agent(), Store())
        first = await ws.plan(Scope(user, app_id="first"))
        gate.armed = True  # the next share stops after reading the leases
        sharing = asyncio.create_task(ws.free_quota(user))
        await gate.stopped.wait()
        planning = asyncio.create_task(ws.plan(Scope(user, app_id="second")))
        await asyncio.sleep(0.2)  # its lease is in; its own share waits for the first
        gate.go.set()
        await sharing
        second = await planning
        assert second.lease in ws.leases
        assert first.grant == second.grant == QUOTA_MIB * MiB // 2
    finally:
        await engine.dispose()


class Gate:
    """Sessions whose next scalar() query, once armed, waits for `go`."""

    def __init__(self) -> None:
        self.armed, self.stopped, self.go = False, asyncio.Event(), asyncio.Event()

    def on(self, sessions):
        @contextlib.asynccontextmanager
        async def opened():
            async with sessions() as db:
                scalar = db.scalar

                async def gated(*args, **kwargs):
                    if self.armed:
                        self.armed = False
                        self.stopped.set()
                        await self.go.wait()
                    return await scalar(*args, **kwargs)
                db.scalar = gated
                yield db
        return opened


async def test_the_sweep_ends_what_a_dead_replica_left_and_nothing_else(tmp_path):
    engine, sessions, (user, _) = await stores.migrated(stores.sqlite_url(tmp_path))
    try:
        agent, store = Agent(), Store()
        dead, alive, leader = (replica(sessions, tmp_path, k, agent, store) for k in (1, 2, 3))
        unbound = await dead.plan(Scope(user, app_id="cut"))     # its create died with it
        torn = await mount(dead, agent, user, "torn", "sbx_torn")  # destroyed, lease left
        ending = await mount(dead, agent, user, "ending", "sbx_ending")  # its end under way
        releasing = await mount(dead, agent, user, "up", "sbx_up")  # its mount uploading
        running = await mount(dead, agent, user, "runs", "sbx_runs")  # runs on
        underway = await alive.plan(Scope(user, app_id="new"))  # a create under way
        long_ago = utcnow() - timedelta(minutes=10)
        await add_sandbox(sessions, user, "sbx_torn", "destroyed", torn.workspace_id, long_ago)
        await add_sandbox(sessions, user, "sbx_ending", "destroyed", ending.workspace_id,
                          utcnow())
        await add_sandbox(sessions, user, "sbx_up", "destroyed", releasing.workspace_id,
                          long_ago)
        await add_sandbox(sessions, user, "sbx_runs", "running", running.workspace_id)

        await leader.sweep(lambda key: gone(key == 1), releasing={"sbx_up"})
        await asyncio.gather(*leader._tasks)  # ended in the background
        async with sessions() as db:
            left = set((await db.execute(select(WorkspaceLease.id))).scalars())
        assert left == {running.lease, underway.lease, ending.lease, releasing.lease}
        assert unbound.lease not in left and torn.lease not in left
    finally:
        await engine.dispose()


async def gone(value: bool) -> bool:
    return value


async def add_sandbox(sessions, user, sandbox_id: str, state: str, workspace_id: str,
                      destroyed_at=None) -> None:
    async with sessions() as db:
        db.add(Sandbox(id=sandbox_id, user_id=user, template="standard", state=state,
                       vcpu=1, cpu_fraction=0.5, memory_mib=512, internet=True, metadata_={},
                       env_vars={}, idle_timeout_seconds=60, max_lifetime_seconds=7200,
                       slot=None, envd_token="", created_at=utcnow(),
                       expires_at=utcnow() + timedelta(hours=2), workspace_id=workspace_id,
                       destroyed_at=destroyed_at))
        await db.commit()


def slow_gets(sessions, delay: float):
    """`sessions` whose get() waits `delay` after reading."""
    @contextlib.asynccontextmanager
    async def opened():
        async with sessions() as db:
            get = db.get

            async def slow_get(*args, **kwargs):
                row = await get(*args, **kwargs)
                await asyncio.sleep(delay)
                return row
            db.get = slow_get
            yield db
    return opened


async def leases(sessions) -> int:
    async with sessions() as db:
        return await db.scalar(select(func.count()).select_from(WorkspaceLease))
