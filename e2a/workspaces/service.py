"""Workspaces as the sandbox host and the API use them: the store (embedded or external), the
registry, and what a sandbox's mount needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from e2a.workspaces import s3
from e2a.workspaces.registry import Registry, cache_limit
from e2a.workspaces.s3 import Endpoint, S3Store
from e2a.workspaces.scope import Scope
from e2a.workspaces.server import EmbeddedS3

log = logging.getLogger("e2a.workspaces")

REMOTE = "ws"  # the S3 remote's name in each mount's environment


@dataclass
class MountPlan:
    """What a sandbox's workspace unit needs to mount (resources.WorkspaceMount)."""

    workspace_id: str
    cache_limit: int   # bytes the mount's cache may hold (the quota, registry.cache_limit)
    fresh: bool        # made for this sandbox: seeded with the template's home directory


class Workspaces:
    def __init__(self, settings, sessions):
        self.settings = settings
        self.registry = Registry(sessions)
        self.quota = settings.workspace_quota_mib * 1024 * 1024
        if settings.s3_endpoint:
            self.server = None
            endpoint = Endpoint(
                url=settings.s3_endpoint, region=settings.s3_region, bucket=settings.s3_bucket,
                access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                sse=settings.s3_sse, public_url=settings.s3_public_url)
        else:
            self.server = EmbeddedS3(settings)
            endpoint = None
        self._endpoint = endpoint
        self._store: S3Store | None = None

    @property
    def store(self) -> S3Store:
        if self._store is None:
            self._store = S3Store(self._endpoint or self.server.endpoint())
        return self._store

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()
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
        """The scope's workspace (made if new) and how much its mount may hold, from the sizes
        as last counted (after each sandbox that mounted a workspace, and by GET .../usage):
        a create does not list a whole workspace in S3."""
        row, fresh = await self.registry.find_or_make(scope)
        await self.registry.touch(row.id)
        others = await self.registry.stored_bytes(scope.user_id, but=row.id)
        return MountPlan(workspace_id=row.id, fresh=fresh,
                         cache_limit=cache_limit(self.quota, others + row.bytes_used,
                                                 row.bytes_used))

    async def refresh_usage(self, workspace_id: str) -> None:
        """Count the workspace again (after a sandbox that mounted it is gone)."""
        try:
            await self.registry.record_usage(workspace_id,
                                              await s3.run(self.store.usage, workspace_id))
        except Exception as exc:  # only figures: they are counted again next time
            log.warning("counting workspace %s failed: %s", workspace_id, exc)
