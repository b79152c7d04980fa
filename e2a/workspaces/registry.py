"""Workspace rows: one per scope, found or made when a sandbox asks for it; its usage as last
counted; and the user's storage quota, turned into what one mount may hold."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError

from e2a.ids import new_id
from e2a.sandboxes.records import utcnow
from e2a.store.models import Sandbox, Workspace
from e2a.workspaces.s3 import Usage
from e2a.workspaces.scope import Scope


class Registry:
    def __init__(self, sessions):
        self.sessions = sessions

    async def find_or_make(self, scope: Scope) -> tuple[Workspace, bool]:
        """The scope's workspace, and whether it was made now."""
        async with self.sessions() as db:
            row = await self._find(db, scope)
            if row is not None:
                return row, False
            now = utcnow()
            row = Workspace(id=new_id("wsp"), user_id=scope.user_id,
                            end_user_id=scope.end_user_id, app_id=scope.app_id,
                            capset_id=scope.capset_id, created_at=now, last_used_at=now,
                            bytes_used=0, file_count=0)
            db.add(row)
            try:
                await db.commit()
                return row, True
            except IntegrityError:  # made by a concurrent create a moment ago
                await db.rollback()
        async with self.sessions() as db:
            return await self._find(db, scope), False

    @staticmethod
    async def _find(db, scope: Scope) -> Workspace | None:
        return (await db.execute(select(Workspace).where(
            Workspace.user_id == scope.user_id, Workspace.end_user_id == scope.end_user_id,
            Workspace.app_id == scope.app_id, Workspace.capset_id == scope.capset_id))
        ).scalar_one_or_none()

    async def get(self, user_id: str, workspace_id: str) -> Workspace | None:
        """The workspace if `user_id` owns it (anyone else's is None, like a missing one)."""
        async with self.sessions() as db:
            row = await db.get(Workspace, workspace_id)
            return row if row is not None and row.user_id == user_id else None

    async def of_user(self, user_id: str, end_user_id: str | None = None) -> list[Workspace]:
        async with self.sessions() as db:
            q = select(Workspace).where(Workspace.user_id == user_id)
            if end_user_id is not None:
                q = q.where(Workspace.end_user_id == end_user_id)
            return list((await db.execute(q.order_by(Workspace.created_at))).scalars())

    async def stored_bytes(self, user_id: str) -> int:
        """The user's workspaces' bytes as last counted."""
        async with self.sessions() as db:
            return int(await db.scalar(self.stored_query(user_id)))

    @staticmethod
    def stored_query(user_id: str):
        """The query of `stored_bytes`, for a caller's own session (the quota share's)."""
        return select(func.coalesce(func.sum(Workspace.bytes_used), 0)).where(
            Workspace.user_id == user_id)

    async def record_usage(self, workspace_id: str, usage: Usage, began: datetime) -> None:
        """A count whose listing began at `began`, unless a count that began later is in
        already (two counts at once, through two replicas: the older one, finished last,
        would hide a file only the newer one saw)."""
        async with self.sessions() as db:
            await db.execute(update(Workspace).where(
                Workspace.id == workspace_id,
                or_(Workspace.usage_at.is_(None), Workspace.usage_at <= began)).values(
                    bytes_used=usage.bytes, file_count=usage.files, usage_at=began))
            await db.commit()

    async def touch(self, workspace_id: str) -> None:
        async with self.sessions() as db:
            row = await db.get(Workspace, workspace_id)
            if row is not None:
                row.last_used_at = utcnow()
                await db.commit()

    async def delete(self, workspace_id: str) -> None:
        async with self.sessions() as db:
            row = await db.get(Workspace, workspace_id)
            if row is not None:
                # Destroyed sandboxes keep their history, without the workspace.
                await db.execute(update(Sandbox).where(Sandbox.workspace_id == workspace_id)
                                 .values(workspace_id=None))
                await db.delete(row)
                await db.commit()


# Room in a mount's cache beyond the user's free quota, for directories' blocks (btrfs counts
# them too; rclone's metadata is kept outside the limit, mount.py).
CACHE_SLACK = 1024 * 1024


def cache_limit(stored_here: int, grant: int) -> int:
    """How many bytes one mount's cache may hold: all of this workspace (so every file in it can
    be read) and the mount's grant of the user's free quota (what may be written). The cache
    never evicts and grows files without holes, so its size bounds what the sandbox can add.
    docs/workspaces.md, "Quota", says where this is exact and where it is not."""
    return stored_here + grant + CACHE_SLACK
