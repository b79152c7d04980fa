"""Workspaces as the sandbox host and the API use them: the store (embedded or external), the
registry, and what a sandbox's mount needs."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Awaitable, Callable, Protocol

from sqlalchemy import delete, func, or_, select, update

from e2a.ids import new_id
from e2a.refusal import Refusal
from e2a.runtime import quota as disk
from e2a.sandboxes.host import Conflict, Unavailable
from e2a.sandboxes.records import aware, utcnow
from e2a.sandboxes.states import LIVE
from e2a.store import locks
from e2a.store.models import Sandbox, Workspace, WorkspaceLease, WorkspaceUpload

from e2a.workspaces import s3
from e2a.workspaces.registry import Registry, cache_limit
from e2a.workspaces.s3 import Endpoint, S3Store
from e2a.workspaces.scope import Scope
from e2a.workspaces.server import EmbeddedS3

log = logging.getLogger("e2a.workspaces")

REMOTE = "ws"  # the S3 remote's name in each mount's environment
STAT_CONCURRENCY = 16  # a settle's S3 HEADs of the user's uploads at once
# A delete's mark older than this is of a replica that died in the middle of it: another
# delete may go on, and creates are no longer refused for it.
DELETE_STALE = timedelta(minutes=15)
DELETE_HEARTBEAT = 60.0  # a delete under way renews its mark this often (seconds)
# The end of a destroyed sandbox's lease is its teardown's; the leader's sweep ends it only
# once it is this late (that replica died, or the end failed).
LEASE_END_GRACE = timedelta(minutes=2)


class WorkspaceBusy(Exception):
    """The workspace is being deleted (409)."""


class QuotaExceeded(Exception):
    """A presigned PUT does not fit what is left of the user's quota (507)."""

    def __init__(self, free: int):
        super().__init__(f"{free} bytes left")
        self.free = free


@dataclass
class MountPlan:
    """What a sandbox's workspace unit needs to mount (resources.WorkspaceMount), and its lease
    on the workspace: held from the create's first step until the sandbox is gone and the
    workspace counted again."""

    workspace_id: str
    fresh: bool        # made for this sandbox: seeded with the template's home directory
    user_id: str = ""
    grant: int = 0     # of the user's free quota, the part this mount may fill
    lease: str = ""    # its row (WorkspaceLease) and key in Workspaces.leases
    stored: int | None = 0  # the workspace's bytes as counted at mount (None: not known)
    since: float = 0.0  # monotonic time its row was in (a share that read before misses it)
    cache: Path | None = None  # the mount's cache volume, once made (resources.WorkspaceMount)
    node: "NodeCache | None" = None  # or, on Kubernetes, its node agent's (kube/node_mounts.py)

    def limit(self) -> int:
        """Bytes the mount's cache may hold now (registry.cache_limit)."""
        return cache_limit(self.stored or 0, self.grant)


class Workspaces:
    def __init__(self, settings, sessions):
        self.settings = settings
        self.sessions = sessions
        self.registry = Registry(sessions)
        self.quota = settings.workspace_quota_mib * 1024 * 1024
        if settings.s3_endpoint:
            self.server = None
            endpoint = Endpoint.from_settings(settings)
        elif settings.backend == "kubernetes":
            # e2a's pods have no rclone: no embedded server. The workspace calls answer 503
            # until an S3 is set (the node agents mount from it too, docs/kubernetes.md).
            self.server = None
            endpoint = None
        else:
            self.server = EmbeddedS3(settings)
            endpoint = None
        self._endpoint = endpoint
        self._store: S3Store | None = None
        # Every sandbox that has (or is about to mount) a workspace holds a lease, a row: a
        # workspace with one cannot be deleted, and the leases' grants share the user's free
        # quota, so that sandboxes mounted at once (through any replica) cannot each fill it.
        # Here: this process's leases, with their mounts' caches.
        self.leases: dict[str, MountPlan] = {}
        self._leasing = asyncio.Lock()  # this process's leases and deletes, in turn
        self._sharing: weakref.WeakValueDictionary[str, asyncio.Lock] = \
            weakref.WeakValueDictionary()  # one share of a user at a time, by user
        self._sweeping: set[str] = set()  # leases the sweep is ending
        self._tasks: set[asyncio.Task] = set()
        # Presigned PUTs handed out are rows too (WorkspaceUpload): a sized one holds its part
        # of the quota until its file is in S3 (then its count holds it) or its URL expires.
        # Replicas (Kubernetes): this one's lock key, written in its leases; and the cache of
        # another replica's mount, through its node's agent ((sandbox id, node) -> NodeCache).
        self.replica: int | None = None
        self.remote_cache: Callable[[str, str], NodeCache] | None = None
        # by lease: (user, cache), made once (each finds its node's address once)
        self._remote: dict[str, tuple[str, NodeCache]] = {}

    @property
    def store(self) -> S3Store:
        if self._endpoint is None and self.server is None:
            raise Refusal(503, "storage_unavailable", "no workspace store: set E2A_S3_ENDPOINT "
                          "(workspaces on Kubernetes, docs/kubernetes.md)")
        if self._store is None:
            self._store = S3Store(self._endpoint or self.server.endpoint())
        return self._store

    async def start(self, only_process: bool) -> None:
        """`only_process`: no other e2a shares the database (the embedded backend): the leases
        in it are all of the process before this one, whose sandboxes are adopted again
        (`adopt`) or were not kept."""
        if only_process:  # ... and its deletes' marks (a delete cut off is tried again)
            async with self.sessions() as db:
                await db.execute(delete(WorkspaceLease))
                await db.execute(update(Workspace).where(Workspace.deleting_at.is_not(None))
                                 .values(deleting_at=None))
                await db.commit()
        if self.server is not None:
            await self.server.start()
        if self.server is not None or self._endpoint is not None:
            await s3.run(self.store.ensure_bucket)

    async def stop(self, mounts_left: bool) -> None:
        """The embedded server stays up while a sandbox still has its workspace mounted: the
        mount may still be uploading, and the sandbox is adopted at the next start."""
        for task in list(self._tasks):  # the sweep's ends: the next leader's sweep redoes them
            task.cancel()
        if self.server is not None and not mounts_left:
            await self.server.stop()

    # ---- for the sandbox host --------------------------------------------------------------

    def mount_env(self) -> dict[str, str]:
        return self.store.rclone_env(REMOTE)

    def remote(self, workspace_id: str) -> str:
        return self.store.remote(REMOTE, workspace_id)

    async def plan(self, scope: Scope) -> MountPlan:
        """The scope's workspace (made if new), leased, and how much its mount may hold: all of
        it, plus a share of what the user's quota has left (`_share`). Sizes are as last
        counted (after each sandbox that mounted a workspace, and by GET .../usage): a create
        does not list a whole workspace in S3."""
        row, fresh = await self.registry.find_or_make(scope)
        if await self._ending(row.id):
            # A sandbox of it just ended and its count is not in yet: count now, or this mount
            # would be sized without what that sandbox wrote (and could not read it back).
            await self.refresh_usage(row.id)
            row = await self.registry.get(scope.user_id, row.id) or row
        plan = await self._lease(MountPlan(workspace_id=row.id, fresh=fresh,
                                           user_id=scope.user_id, stored=row.bytes_used))
        try:
            await self._share(scope.user_id)
            await self.registry.touch(row.id)
        except BaseException:
            await self.release(plan)
            raise
        return plan

    async def plan_for_create(self, scope: Scope) -> MountPlan:
        """`plan`, its failures as a sandbox create answers them: 409 while the workspace is
        being deleted, 503 when the store does not answer."""
        try:
            return await self.plan(scope)
        except WorkspaceBusy as exc:
            raise Conflict(str(exc)) from exc
        except Exception as exc:
            raise Unavailable(f"the workspace store did not answer: {exc}") from exc

    async def _share(self, user_id: str, upload: WorkspaceUpload | None = None) -> int:
        """Share the user's free quota among their leases: each keeps what it has written and
        gets an equal part of what is left; the limits of mounts already running are changed
        to match. Returns what is left unwritten (for presigned PUTs). With `upload`: first
        hold its size (QuotaExceeded, nothing held, if it does not fit), in the same locked
        transaction, so that URLs asked for at once through any replicas cannot each get the
        same free space."""
        lock = self._sharing.get(user_id)
        if lock is None:
            lock = self._sharing[user_id] = asyncio.Lock()
        async with lock, self.sessions() as db:
            # every replica's leases of the user, shared by one replica at a time
            await locks.lock_user(db, locks.QUOTA_SHARE, user_id)
            began = time.monotonic()
            rows = list((await db.execute(select(WorkspaceLease).where(
                WorkspaceLease.user_id == user_id))).scalars())
            stored = int(await db.scalar(Registry.stored_query(user_id)))
            held = {r.id for r in rows}
            for gone in [k for k, p in self.leases.items() if p.user_id == user_id
                         and k not in held and p.since < began]:  # ended elsewhere
                del self.leases[gone]
            for gone in [k for k, (u, _) in self._remote.items() if u == user_id
                         and k not in held]:
                del self._remote[gone]
            leases = [self.leases.get(r.id) or self._elsewhere(r) for r in rows]
            written = await asyncio.gather(*(_written(p) for p in leases))
            # Sized PUTs hold until a settle lets them go (after a count that has their file,
            # even once expired); only of workspaces that still are (a claim can race a delete).
            promised = int(await db.scalar(
                select(func.coalesce(func.sum(WorkspaceUpload.size), 0)).where(
                    WorkspaceUpload.user_id == user_id, WorkspaceUpload.workspace_id.in_(
                        select(Workspace.id).where(Workspace.user_id == user_id)))))
            left = free = self.quota - stored - sum(written) - promised
            refused = upload is not None and (left <= 0 or (upload.size or 0) > left)
            if upload is not None and not refused:
                db.add(upload)
                left -= upload.size or 0
            share = max(0, left) // max(1, len(leases))
            for p, w in zip(leases, written):
                p.grant = w + share
            await asyncio.gather(*(_set_limit(p) for p in leases if p.stored is not None))
            await db.commit()
        if refused:  # after the limits were set, as for any share
            raise QuotaExceeded(max(free, 0))
        return free

    def _elsewhere(self, row: WorkspaceLease) -> MountPlan:
        """A lease of another replica (or of one gone): its mount, if made, through its node's
        agent; one not mounted yet has written nothing and takes its limit when mounted."""
        node = self._remote.get(row.id, (row.user_id, None))[1]
        if node is None and self.remote_cache is not None and row.sandbox_id and row.node_name:
            node = self.remote_cache(row.sandbox_id, row.node_name)
            self._remote[row.id] = (row.user_id, node)
        return MountPlan(row.workspace_id, False, user_id=row.user_id, lease=row.id,
                         stored=row.stored if node is not None else None, node=node)

    async def free_quota(self, user_id: str) -> int:
        """What of the user's quota neither stored files, running mounts' writes nor sized
        presigned PUTs under way take (may be negative)."""
        await self._settle_uploads(user_id)
        return await self._share(user_id)

    async def claim_upload(self, user_id: str, workspace_id: str, path: str, size: int | None,
                           seconds: int) -> int:
        """Before a presigned PUT is handed out: what is free of the quota, and with `size`
        that much held for the upload (QuotaExceeded when it does not fit or nothing is
        free). Unsized, it holds nothing, but its workspace is counted again until the URL
        has been used or has expired."""
        await self._settle_uploads(user_id)
        now = utcnow()
        return await self._share(user_id, WorkspaceUpload(
            id=new_id("wup"), workspace_id=workspace_id, user_id=user_id, path=path,
            size=size or None, created_at=now, expires_at=now + timedelta(seconds=seconds)))

    async def _settle_uploads(self, user_id: str) -> None:
        """Count again the user's workspaces written through presigned URLs (any replica's),
        and let go of the uploads now in S3 (their bytes are in that count) or whose URL
        expired. Which uploads are in S3 is looked at *before* the count: a file that lands
        between the two is then counted and still held (until the next settle), never
        neither, which let a second URL take the same free space (CI: 24 MiB under a 16 MiB
        quota). A workspace deleted while a URL was out is emptied again once it expired."""
        async with self.sessions() as db:
            rows = list((await db.execute(select(WorkspaceUpload).where(
                WorkspaceUpload.user_id == user_id))).scalars())
            live = set((await db.execute(select(Workspace.id).where(
                Workspace.id.in_({r.workspace_id for r in rows})))).scalars())
        now = utcnow()
        expired = {up.id for up in rows if aware(up.expires_at) <= now}
        stats = asyncio.Semaphore(STAT_CONCURRENCY)

        async def landed(up: WorkspaceUpload) -> bool:
            if up.id in expired:
                return True
            async with stats:
                try:
                    found = await s3.run(self.store.stat, up.workspace_id, up.path)
                except Exception:
                    return False
            return (found is not None and (up.size is None or found[0] == up.size)
                    and found[1] >= aware(up.created_at) - timedelta(seconds=2))

        pending = [up for up in rows if up.workspace_id in live]
        done = [up for up, yes in zip(pending, await asyncio.gather(*map(landed, pending)))
                if yes]
        # A deleted workspace's uploads hold nothing (`_share` sums those of workspaces that
        # are); what a URL still out wrote under it goes once the URL expired.
        for workspace_id in {up.workspace_id for up in rows} - live:
            gone = [up for up in rows if up.workspace_id == workspace_id and up.id in expired]
            if not gone:
                continue
            try:
                await s3.run(self.store.delete_all, workspace_id)
                done += gone
            except Exception as exc:  # tried again at the next settle
                log.warning("emptying deleted workspace %s again failed: %s", workspace_id, exc)
        for workspace_id in live:
            if not await self.refresh_usage(workspace_id):  # held until a count has them
                done = [up for up in done if up.workspace_id != workspace_id]
        if done:
            async with self.sessions() as db:
                await db.execute(delete(WorkspaceUpload).where(
                    WorkspaceUpload.id.in_([up.id for up in done])))
                await db.commit()

    async def count_uploaded(self) -> None:
        """Count every workspace written through presigned URLs since its last count (before
        storage is charged from the counts)."""
        async with self.sessions() as db:
            users = set((await db.execute(select(WorkspaceUpload.user_id).distinct())).scalars())
        for user_id in users:
            try:
                await self._settle_uploads(user_id)
            except Exception as exc:  # one user's failure does not keep the others uncounted
                log.warning("counting the uploads of %s failed: %s", user_id, exc)

    async def adopt(self, workspace_id: str, user_id: str, sandbox_id: str) -> MountPlan:
        """The lease of a sandbox found running at start. What it had at mount is not known:
        its limit stays as it was set, and all of its cache counts as written."""
        return await self._lease(MountPlan(workspace_id, False, user_id=user_id, stored=None),
                                 sandbox_id=sandbox_id, adopted=True)

    async def _lease(self, plan: MountPlan, sandbox_id: str | None = None,
                     adopted: bool = False) -> MountPlan:
        """Hold the workspace for a sandbox (WorkspaceBusy while it is being deleted): checked
        and written under the user's lock, which a delete through any replica takes too, so
        that one of the two sees the other."""
        async with self._leasing, self.sessions() as db:
            await locks.lock_user(db, locks.WORKSPACES, plan.user_id)
            ws = await db.get(Workspace, plan.workspace_id, populate_existing=True)
            if ws is None or (_deleting(ws) and not adopted):
                raise WorkspaceBusy(f"workspace {plan.workspace_id} is being deleted")
            plan.lease = new_id("wls")
            db.add(WorkspaceLease(id=plan.lease, workspace_id=plan.workspace_id,
                                  user_id=plan.user_id, replica=self.replica,
                                  sandbox_id=sandbox_id, stored=plan.stored,
                                  created_at=utcnow()))
            await db.commit()
        plan.since = time.monotonic()
        self.leases[plan.lease] = plan
        return plan

    async def bind(self, plan: MountPlan, sandbox_id: str, node_name: str | None = None
                   ) -> None:
        """Kubernetes: the lease's sandbox (before its row: whichever replica ends the
        sandbox ends the lease), then the node mounting it (before the mount: where every
        replica measures and limits that mount)."""
        values = {"sandbox_id": sandbox_id, **({"node_name": node_name} if node_name else {})}
        async with self.sessions() as db:
            await db.execute(update(WorkspaceLease).where(WorkspaceLease.id == plan.lease)
                             .values(**values))
            await db.commit()

    async def mounted(self, plan: MountPlan) -> None:
        """Kubernetes: the mount is made: the user's quota is shared again, with the limits of
        every replica's mounts, this one's among them (another replica's share since this
        one was planned saw it unmounted and could not set it). If it cannot be, the create
        fails (Unavailable): the mount's planned limit may be more than its share now."""
        try:
            await self._share(plan.user_id)
        except Exception as exc:
            raise Unavailable(f"the workspace quota could not be shared: {exc}") from exc

    async def release(self, plan: MountPlan) -> None:
        """A lease let go of without its sandbox (a create that failed); whatever cancels
        the caller, the row goes."""
        self.leases.pop(plan.lease, None)
        await asyncio.shield(self._drop([plan.lease]))

    def forget(self, plan: MountPlan) -> None:
        """This process no longer holds the lease; its row stays (another replica ends it)."""
        self.leases.pop(plan.lease, None)

    async def _drop(self, lease_ids: list[str]) -> None:
        async with self.sessions() as db:
            await db.execute(delete(WorkspaceLease).where(WorkspaceLease.id.in_(lease_ids)))
            await db.commit()

    async def _ending(self, workspace_id: str) -> bool:
        """Whether a sandbox of the workspace ended and its count is not in yet."""
        async with self.sessions() as db:
            return bool(await db.scalar(select(func.count()).select_from(WorkspaceLease)
                                        .where(WorkspaceLease.workspace_id == workspace_id,
                                               WorkspaceLease.ended)))

    async def in_use(self, workspace_ids: list[str]) -> set[str]:
        """Of these workspaces, those a sandbox has or is being created with (any replica's)."""
        async with self.sessions() as db:
            return await _in_use(db, workspace_ids)

    async def mark_ended(self, sandbox_id: str, plan: MountPlan | None) -> None:
        """The sandbox is gone, its files all in S3: its leases (`plan`, this replica's, and
        any naming the sandbox) no longer keep the workspace from a delete, at once (before
        its `destroyed` is answered); they hold their share of the quota until the workspace
        is counted again (`ended`, `sandbox_gone`: in the background)."""
        which = WorkspaceLease.sandbox_id == sandbox_id
        if plan is not None:
            which = or_(which, WorkspaceLease.id == plan.lease)
        try:
            async with self.sessions() as db:
                await db.execute(update(WorkspaceLease).where(which).values(ended=True))
                await db.commit()
        except Exception as exc:  # `ended` marks it again
            log.warning("marking the leases of %s ended failed: %s", sandbox_id, exc)

    async def ended(self, plan: MountPlan) -> None:
        """A sandbox that had the workspace is gone (its files all in S3): count the workspace
        again, then give its grant back (not before: the count is what the next mount sees)."""
        await self._end([plan.lease], plan.workspace_id, plan.user_id)

    async def sandbox_gone(self, sandbox_id: str, workspace_id: str, user_id: str) -> None:
        """`ended` for the leases of a sandbox, whichever replica made them (Kubernetes: the
        replica that tore the sandbox down, its files all in S3)."""
        async with self.sessions() as db:
            ids = list((await db.execute(select(WorkspaceLease.id).where(
                WorkspaceLease.sandbox_id == sandbox_id))).scalars())
        for lease in ids:
            self.leases.pop(lease, None)
        await self._end(ids, workspace_id, user_id)

    async def _end(self, lease_ids: list[str], workspace_id: str, user_id: str) -> None:
        try:
            async with self.sessions() as db:  # the workspace may be deleted now
                await db.execute(update(WorkspaceLease)
                                 .where(WorkspaceLease.id.in_(lease_ids)).values(ended=True))
                await db.commit()
            await self.refresh_usage(workspace_id)
        finally:
            for lease in lease_ids:
                self.leases.pop(lease, None)
            await self._drop(lease_ids)
        await self._share(user_id)  # the others get its part

    async def sweep(self, replica_gone: Callable[[int | None], Awaitable[bool]],
                    releasing: set[str]) -> None:
        """Kubernetes, the leader: leases nobody will end, ended in the background (each
        counts a workspace). One whose sandbox was destroyed a while ago (its teardown's
        replica died before the end, or the end failed); one with no sandbox row whose
        replica is gone (a create that died with it). Not one whose sandbox's leftover mount
        is still being uploaded (`releasing`): it is counted after."""
        async with self.sessions() as db:
            rows = list((await db.execute(select(WorkspaceLease))).scalars())
            sandboxes = {sid: (state, destroyed_at) for sid, state, destroyed_at in (
                await db.execute(select(Sandbox.id, Sandbox.state, Sandbox.destroyed_at).where(
                    Sandbox.id.in_([r.sandbox_id for r in rows if r.sandbox_id]))))}
        now = utcnow()
        for r in rows:
            if r.id in self._sweeping or r.sandbox_id in releasing:
                continue
            state, destroyed_at = sandboxes.get(r.sandbox_id, (None, None))
            if state is None:  # no row: a create under way, unless its replica is gone
                if not await replica_gone(r.replica):
                    continue
            elif state in {s.value for s in LIVE} or destroyed_at is None \
                    or now - aware(destroyed_at) < LEASE_END_GRACE:
                continue  # its sandbox runs, or its teardown is ending it now
            log.info("ending lease %s of workspace %s: its sandbox %s is gone", r.id,
                     r.workspace_id, r.sandbox_id or "(never made)")
            self._sweeping.add(r.id)
            task = asyncio.create_task(self._end_swept(r))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _end_swept(self, row: WorkspaceLease) -> None:
        try:
            await self._end([row.id], row.workspace_id, row.user_id)
        except Exception as exc:  # the next sweep tries again
            log.warning("ending lease %s failed: %s", row.id, exc)
        finally:
            self._sweeping.discard(row.id)

    async def delete(self, workspace_id: str, user_id: str) -> None:
        """Every object and the row; WorkspaceBusy while a sandbox has it or mounts it. Marked
        as being deleted under the user's lock (leases check the mark under it), so that a
        create through another replica cannot lease it in the middle."""
        async with self._leasing, self.sessions() as db:
            await locks.lock_user(db, locks.WORKSPACES, user_id)
            ws = await db.get(Workspace, workspace_id, populate_existing=True)
            if ws is None:
                return
            if workspace_id in await _in_use(db, [workspace_id]):
                raise WorkspaceBusy(f"workspace {workspace_id} is mounted by a sandbox: delete "
                                    "the sandbox first")
            if _deleting(ws):
                raise WorkspaceBusy(f"workspace {workspace_id} is being deleted")
            ws.deleting_at = utcnow()
            await db.commit()
        heartbeat = asyncio.create_task(self._renew_mark(workspace_id))
        try:
            await s3.run(self.store.delete_all, workspace_id)
            await self.registry.delete(workspace_id)
        except Exception:
            heartbeat.cancel()
            await self._mark(workspace_id, None)  # not deleted: usable again
            raise
        finally:  # cancelled (e2a stopping): the objects may still be going, the mark stays
            heartbeat.cancel()

    async def _renew_mark(self, workspace_id: str) -> None:
        """A long delete (millions of objects) renews its mark: never taken for stale."""
        while True:
            await asyncio.sleep(DELETE_HEARTBEAT)
            await self._mark(workspace_id, utcnow())

    async def _mark(self, workspace_id: str, at: datetime | None) -> None:
        try:
            async with self.sessions() as db:
                await db.execute(update(Workspace).where(Workspace.id == workspace_id)
                                 .values(deleting_at=at))
                await db.commit()
        except Exception as exc:  # stale after DELETE_STALE
            log.warning("marking workspace %s (%s) failed: %s", workspace_id, at, exc)

    async def answers(self) -> bool:
        """Whether the S3 store answers at all (a refused upload is then S3 refusing it)."""
        try:
            store = self.store
        except Exception:  # none configured
            return False
        return await s3.run(store.answers)

    async def refresh_usage(self, workspace_id: str) -> bool:
        """Count the workspace again (after a sandbox that mounted it is gone); False if it
        could not be."""
        began = utcnow()
        try:
            await self.registry.record_usage(workspace_id,
                                              await s3.run(self.store.usage, workspace_id),
                                              began)
        except Exception as exc:  # only figures: they are counted again next time
            log.warning("counting workspace %s failed: %s", workspace_id, exc)
            return False
        return True


class NodeCache(Protocol):
    """A mount's cache on another machine (a Kubernetes node), through its agent."""

    async def set_limit(self, limit: int) -> None: ...

    async def allocated(self) -> int: ...


def _deleting(ws: Workspace) -> bool:
    return ws.deleting_at is not None and utcnow() - aware(ws.deleting_at) < DELETE_STALE


async def _in_use(db, workspace_ids: list[str]) -> set[str]:
    """Workspaces with a lease not ended, or a live sandbox (of any replica) mounting them."""
    leased = (await db.execute(select(WorkspaceLease.workspace_id).where(
        WorkspaceLease.workspace_id.in_(workspace_ids), ~WorkspaceLease.ended))).scalars()
    mounted = (await db.execute(select(Sandbox.workspace_id).where(
        Sandbox.workspace_id.in_(workspace_ids),
        Sandbox.state.in_([s.value for s in LIVE])))).scalars()
    return set(leased) | set(mounted)


async def _set_limit(plan: MountPlan) -> None:
    try:
        if plan.cache is not None:
            await asyncio.to_thread(disk.set_limit, plan.cache, plan.limit())
        elif plan.node is not None:
            await plan.node.set_limit(plan.limit())
    except Exception as exc:  # its sandbox is going: nothing left to limit
        log.debug("limit of lease %s not changed: %s", plan.lease, exc)


async def _written(plan: MountPlan) -> int:
    """What a mount's cache holds beyond the workspace's size at mount: its new bytes (reads
    count until they are within that size)."""
    if plan.node is not None:
        try:
            held = await plan.node.allocated()
        except Exception:  # the agent does not answer: as if nothing were written
            return 0
    elif plan.cache is None or not plan.cache.exists():
        return 0
    else:
        held = await asyncio.to_thread(disk.allocated, plan.cache / "vfs")
    return max(0, held - (plan.stored or 0))
