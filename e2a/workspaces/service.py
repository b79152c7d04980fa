"""Workspaces as the sandbox host and the API use them: the store (embedded or external), the
registry, and what a sandbox's mount needs."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol

from e2a.refusal import Refusal
from e2a.sandboxes.host import Conflict, Unavailable
from e2a.runtime import quota as disk

from e2a.workspaces import s3
from e2a.workspaces.registry import Registry, cache_limit
from e2a.workspaces.s3 import Endpoint, S3Store
from e2a.workspaces.scope import Scope
from e2a.workspaces.server import EmbeddedS3

log = logging.getLogger("e2a.workspaces")

REMOTE = "ws"  # the S3 remote's name in each mount's environment


class WorkspaceBusy(Exception):
    """The workspace is being deleted (409)."""


class QuotaExceeded(Exception):
    """A presigned PUT does not fit what is left of the user's quota (507)."""

    def __init__(self, free: int):
        super().__init__(f"{free} bytes left")
        self.free = free


@dataclass
class Upload:
    """A sized presigned PUT handed out: its bytes held from the user's quota until they are in
    S3 or the URL expires."""

    user_id: str
    workspace_id: str
    path: str
    size: int
    since: datetime       # when the URL was made (the file must be written after it)
    deadline: float       # monotonic time the URL expires


@dataclass
class MountPlan:
    """What a sandbox's workspace unit needs to mount (resources.WorkspaceMount), and its lease
    on the workspace: held from the create's first step until the sandbox is gone and the
    workspace counted again."""

    workspace_id: str
    fresh: bool        # made for this sandbox: seeded with the template's home directory
    user_id: str = ""
    grant: int = 0     # of the user's free quota, the part this mount may fill
    lease: int = 0     # its key in Workspaces.leases
    stored: int | None = 0  # the workspace's bytes as counted at mount (None: not known)
    cache: Path | None = None  # the mount's cache volume, once made (resources.WorkspaceMount)
    node: "NodeCache | None" = None  # or, on Kubernetes, its node agent's (kube/node_mounts.py)
    ended: bool = False  # its sandbox is gone; held only until the workspace is counted again

    def limit(self) -> int:
        """Bytes the mount's cache may hold now (registry.cache_limit)."""
        return cache_limit(self.stored or 0, self.grant)


class Workspaces:
    def __init__(self, settings, sessions):
        self.settings = settings
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
        # Every sandbox that has (or is about to mount) a workspace holds a lease: a workspace
        # with one cannot be deleted, and the leases' grants share the user's free quota, so
        # that sandboxes mounted at once cannot each fill it.
        self.leases: dict[int, MountPlan] = {}
        self.deleting: set[str] = set()
        self._next_lease = 0
        self._sharing = asyncio.Lock()
        self._claiming = asyncio.Lock()
        # Sized presigned PUTs whose bytes are not in S3 yet: they hold their part of the
        # quota until the file is there (then its count holds it) or the URL expires.
        self.uploads: list[Upload] = []
        # Workspaces written through presigned URLs since they were last counted (by id: the
        # user), counted again before the next quota check and the next storage charge.
        self.touched: dict[str, str] = {}
        # Replicas (Kubernetes): whether a sandbox of another replica has the workspace, which
        # this one's leases do not show (async, workspace id -> bool).
        self.in_use_elsewhere = None

    @property
    def store(self) -> S3Store:
        if self._endpoint is None and self.server is None:
            raise Refusal(503, "storage_unavailable", "no workspace store: set E2A_S3_ENDPOINT "
                          "(workspaces on Kubernetes, docs/kubernetes.md)")
        if self._store is None:
            self._store = S3Store(self._endpoint or self.server.endpoint())
        return self._store

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()
        if self.server is not None or self._endpoint is not None:
            await s3.run(self.store.ensure_bucket)

    async def stop(self, mounts_left: bool) -> None:
        """The embedded server stays up while a sandbox still has its workspace mounted: the
        mount may still be uploading, and the sandbox is adopted at the next start."""
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
        if any(p.workspace_id == row.id and p.ended for p in self.leases.values()):
            # A sandbox of it just ended and its count is not in yet: count now, or this mount
            # would be sized without what that sandbox wrote (and could not read it back).
            await self.refresh_usage(row.id)
            row = await self.registry.get(scope.user_id, row.id) or row
        # From here to the lease, no await: a DELETE either sees the lease or is seen here.
        if row.id in self.deleting:
            raise WorkspaceBusy(f"workspace {row.id} is being deleted")
        plan = self._lease(MountPlan(workspace_id=row.id, fresh=fresh,
                                     user_id=scope.user_id, stored=row.bytes_used))
        try:
            await self._share(scope.user_id)
            await self.registry.touch(row.id)
        except BaseException:
            self.release(plan)
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

    async def _share(self, user_id: str) -> int:
        """Share the user's free quota among their leases: each keeps what it has written and
        gets an equal part of what is left; the limits of mounts already running are changed
        to match. Returns what is left unwritten (for presigned PUTs)."""
        async with self._sharing:
            leases = [p for p in self.leases.values() if p.user_id == user_id]
            written = {p.lease: await _written(p) for p in leases}
            left = (self.quota - await self.registry.stored_bytes(user_id)
                    - sum(written.values())
                    - sum(u.size for u in self.uploads if u.user_id == user_id))
            share = max(0, left) // max(1, len(leases))
            for p in leases:
                p.grant = written[p.lease] + share
                if p.stored is None:
                    continue
                try:
                    if p.cache is not None:
                        await asyncio.to_thread(disk.set_limit, p.cache, p.limit())
                    elif p.node is not None:
                        await p.node.set_limit(p.limit())
                except Exception as exc:  # its sandbox is going: nothing left to limit
                    log.debug("limit of lease %d not changed: %s", p.lease, exc)
            return left

    async def free_quota(self, user_id: str) -> int:
        """What of the user's quota neither stored files, running mounts' writes nor sized
        presigned PUTs under way take (may be negative)."""
        await self._settle_uploads(user_id)
        return await self._share(user_id)

    async def claim_upload(self, user_id: str, workspace_id: str, path: str, size: int | None,
                           seconds: int) -> int:
        """Before a presigned PUT is handed out: what is free of the quota, and with `size`
        that much held for the upload (QuotaExceeded when it does not fit). Checked and held
        under one lock, so URLs asked for at once cannot each get the same free space."""
        async with self._claiming:
            free = await self.free_quota(user_id)
            if free <= 0 or (size is not None and size > free):
                raise QuotaExceeded(max(free, 0))
            if size:
                self.uploads.append(Upload(user_id, workspace_id, path, size,
                                           datetime.now(timezone.utc),
                                           time.monotonic() + seconds))
            self.touched[workspace_id] = user_id
            return free

    async def _settle_uploads(self, user_id: str) -> None:
        """Count again the user's workspaces written through presigned URLs, and let go of the
        holds of uploads now in S3 (their bytes are in that count) or whose URL expired.
        Which uploads are in S3 is looked at *before* the count: a file that lands between the
        two is then counted and still held (until the next settle), never neither, which let
        a second URL take the same free space (CI: 24 MiB under a 16 MiB quota)."""
        now = time.monotonic()
        done = []
        for up in [u for u in self.uploads if u.user_id == user_id]:
            landed = up.deadline < now
            if not landed:
                try:
                    found = await s3.run(self.store.stat, up.workspace_id, up.path)
                except Exception:
                    found = None
                landed = (found is not None and found[0] == up.size
                          and found[1] >= up.since - timedelta(seconds=2))
            if landed:
                done.append(up)
        for workspace_id in [w for w, u in self.touched.items() if u == user_id]:
            self.touched.pop(workspace_id, None)
            await self.refresh_usage(workspace_id)
        for up in done:
            if up in self.uploads:  # a concurrent settle may have let it go already
                self.uploads.remove(up)
        for up in self.uploads:  # still held: their workspaces are counted again next time
            if up.user_id == user_id:
                self.touched[up.workspace_id] = user_id

    async def count_touched(self) -> None:
        """Count every workspace written through presigned URLs since its last count (before
        storage is charged from the counts)."""
        for user_id in set(self.touched.values()):
            await self._settle_uploads(user_id)

    def adopt(self, workspace_id: str, user_id: str) -> MountPlan:
        """The lease of a sandbox found running at start. What it had at mount is not known:
        its limit stays as it was set, and all of its cache counts as written."""
        return self._lease(MountPlan(workspace_id, False, user_id=user_id, stored=None))

    def _lease(self, plan: MountPlan) -> MountPlan:
        self._next_lease += 1
        plan.lease = self._next_lease
        self.leases[plan.lease] = plan
        return plan

    def release(self, plan: MountPlan) -> None:
        self.leases.pop(plan.lease, None)

    def leased(self, workspace_id: str) -> bool:
        """Whether a sandbox has the workspace, or is being created with it."""
        return any(p.workspace_id == workspace_id and not p.ended
                   for p in self.leases.values())

    async def ended(self, plan: MountPlan) -> None:
        """A sandbox that had the workspace is gone (its files all in S3): count the workspace
        again, then give its grant back (not before: the count is what the next mount sees)."""
        plan.ended = True  # the workspace may be deleted now
        try:
            await self.refresh_usage(plan.workspace_id)
        finally:
            self.release(plan)
        await self._share(plan.user_id)  # the others get its part

    async def delete(self, workspace_id: str) -> None:
        """Every object and the row; WorkspaceBusy while a sandbox has it or mounts it."""
        busy = WorkspaceBusy(f"workspace {workspace_id} is mounted by a sandbox: delete the "
                             "sandbox first")
        if self.leased(workspace_id) or workspace_id in self.deleting:
            raise busy
        self.deleting.add(workspace_id)  # before any await: a create here now sees it
        try:
            if self.in_use_elsewhere is not None and await self.in_use_elsewhere(workspace_id):
                raise busy
            await s3.run(self.store.delete_all, workspace_id)
            await self.registry.delete(workspace_id)
        finally:
            self.deleting.discard(workspace_id)

    async def answers(self) -> bool:
        """Whether the S3 store answers at all (a refused upload is then S3 refusing it)."""
        try:
            store = self.store
        except Exception:  # none configured
            return False
        return await s3.run(store.answers)

    async def refresh_usage(self, workspace_id: str) -> None:
        """Count the workspace again (after a sandbox that mounted it is gone)."""
        try:
            await self.registry.record_usage(workspace_id,
                                              await s3.run(self.store.usage, workspace_id))
        except Exception as exc:  # only figures: they are counted again next time
            log.warning("counting workspace %s failed: %s", workspace_id, exc)


class NodeCache(Protocol):
    """A mount's cache on another machine (a Kubernetes node), through its agent."""

    async def set_limit(self, limit: int) -> None: ...

    async def allocated(self) -> int: ...


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
