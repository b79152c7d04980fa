"""The quota held by sized presigned PUTs (e2a/workspaces/service.py), over a real store: a hold
goes only once its file is in a count of the workspace, whatever the order in which the upload
lands; holds are rows, so that URLs asked for through two replicas (or before and after a
restart) cannot each get the same free space; a deleted workspace's holds go with it, and what
a URL still out wrote under it is deleted once the URL expired."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, update

from e2a.config import Settings
from e2a.store.models import WorkspaceUpload
from e2a.workspaces.s3 import Usage
from e2a.workspaces.scope import Scope
from e2a.workspaces.service import QuotaExceeded, Workspaces
from tests.unit import stores
from tests.unit.stores import migrated, sqlite_url

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Bucket:
    """S3 as the uploads use it: files by workspace, counts, stats, deletes."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], int] = {}
        self.emptied: list[str] = []

    def usage(self, workspace_id: str) -> Usage:
        sizes = [n for (w, _), n in self.files.items() if w == workspace_id]
        return Usage(sum(sizes), len(sizes))

    def stat(self, workspace_id: str, path: str):
        size = self.files.get((workspace_id, path))
        return None if size is None else (size, datetime.now(timezone.utc))

    def delete_all(self, workspace_id: str) -> None:
        self.emptied.append(workspace_id)
        for key in [k for k in self.files if k[0] == workspace_id]:
            del self.files[key]


class LandsWhileCounted(Bucket):
    """The uploaded file lands right after the first count of the workspace began (the PUT
    finishes while e2a lists the workspace)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[tuple[str, str], int] = {}

    def usage(self, workspace_id: str) -> Usage:
        counted = super().usage(workspace_id)
        self.files.update(self.pending)  # ... and the PUT completes just after
        self.pending.clear()
        return counted


def replica(sessions, tmp_path, store: Bucket, quota_mib: int = 16) -> Workspaces:
    ws = Workspaces(Settings(data_dir=tmp_path, backend="kubernetes",
                             workspace_quota_mib=quota_mib), sessions)
    ws._endpoint, ws._store = "fake", store
    return ws


async def holds(sessions) -> int:
    async with sessions() as db:
        return await db.scalar(select(func.count()).select_from(WorkspaceUpload))


@pytest.fixture(params=["sqlite", "postgresql"])
async def env(request, tmp_path):
    engine, sessions, users = await stores.either(request.param, tmp_path, "uploads")
    yield sessions, users, request.param
    await engine.dispose()


async def test_an_upload_landing_during_a_count_stays_held_until_counted(tmp_path):
    engine, sessions, (user, _) = await migrated(sqlite_url(tmp_path))
    try:
        store = LandsWhileCounted()
        ws = replica(sessions, tmp_path, store)
        row, _ = await ws.registry.find_or_make(Scope(user))
        assert await ws.claim_upload(user, row.id, "one.bin", 12 * MiB, 600) == 16 * MiB
        store.pending[(row.id, "one.bin")] = 12 * MiB  # in flight: lands during the next count
        assert await ws.free_quota(user) == 4 * MiB   # held, then counted: never neither
        assert await ws.free_quota(user) == 4 * MiB   # counted, the hold let go
        assert await holds(sessions) == 0
        with pytest.raises(QuotaExceeded):
            await ws.claim_upload(user, row.id, "two.bin", 12 * MiB, 600)
    finally:
        await engine.dispose()


async def test_urls_asked_for_through_two_replicas_share_one_quota(env, tmp_path):
    """Before, each replica held its URLs in its own memory: 12 MiB through each of two
    replicas were both handed out under a 16 MiB quota."""
    sessions, (user, _), _ = env
    store = Bucket()
    one, two = replica(sessions, tmp_path, store), replica(sessions, tmp_path, store)
    row, _ = await one.registry.find_or_make(Scope(user))
    await one.claim_upload(user, row.id, "one.bin", 12 * MiB, 600)
    with pytest.raises(QuotaExceeded) as refused:
        await two.claim_upload(user, row.id, "two.bin", 12 * MiB, 600)
    assert refused.value.free == 4 * MiB
    assert await two.free_quota(user) == 4 * MiB
    # a restarted replica (a new process on the same database) still sees the hold
    assert await replica(sessions, tmp_path, store).free_quota(user) == 4 * MiB
    store.files[(row.id, "one.bin")] = 12 * MiB  # the upload lands: its count holds it now
    assert await two.free_quota(user) == 4 * MiB
    assert await holds(sessions) == 0


async def test_urls_asked_for_at_once_through_two_replicas_get_the_space_once(env, tmp_path):
    """Replicas on PostgreSQL (the user's advisory lock orders them); on SQLite, the one
    process e2a runs there (its lock by user)."""
    sessions, (user, _), backend = env
    store = Bucket()
    one = replica(sessions, tmp_path, store)
    two = replica(sessions, tmp_path, store) if backend == "postgresql" else one
    row, _ = await one.registry.find_or_make(Scope(user))
    for round_ in range(5):
        results = await asyncio.gather(
            one.claim_upload(user, row.id, f"a{round_}", 10 * MiB, 600),
            two.claim_upload(user, row.id, f"b{round_}", 10 * MiB, 600),
            return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["QuotaExceeded", "int"], results
        async with sessions() as db:  # expired: the next round starts from a free quota
            await db.execute(update(WorkspaceUpload).values(
                expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
            await db.commit()
        assert await one.free_quota(user) == 16 * MiB


async def test_an_unsized_url_needs_free_space_and_holds_none(env, tmp_path):
    sessions, (user, _), _ = env
    store = Bucket()
    ws = replica(sessions, tmp_path, store)
    row, _ = await ws.registry.find_or_make(Scope(user))
    await ws.claim_upload(user, row.id, "any.bin", None, 600)
    assert await ws.free_quota(user) == 16 * MiB
    store.files[(row.id, "any.bin")] = 20 * MiB  # an unsized PUT may pass the quota
    assert await ws.free_quota(user) == -4 * MiB  # counted once it landed
    with pytest.raises(QuotaExceeded):
        await ws.claim_upload(user, row.id, "more.bin", None, 600)


async def test_a_deleted_workspace_holds_nothing_and_is_emptied_once_its_urls_expired(
        env, tmp_path):
    sessions, (user, _), _ = env
    store = Bucket()
    ws = replica(sessions, tmp_path, store)
    row, _ = await ws.registry.find_or_make(Scope(user))
    await ws.claim_upload(user, row.id, "late.bin", 12 * MiB, 600)
    await ws.delete(row.id, user)
    assert await ws.free_quota(user) == 16 * MiB  # its hold went with it
    store.files[(row.id, "late.bin")] = 12 * MiB  # the URL, still valid, writes under it
    await ws.count_uploaded()
    assert (row.id, "late.bin") in store.files and await holds(sessions) == 1
    async with sessions() as db:  # the URL expires
        await db.execute(update(WorkspaceUpload).values(
            expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
        await db.commit()
    await ws.count_uploaded()  # as before each storage charge
    assert (row.id, "late.bin") not in store.files
    assert store.emptied == [row.id, row.id] and await holds(sessions) == 0


async def test_an_expired_url_whose_file_landed_holds_until_a_count_has_it(env, tmp_path):
    """A share that does not settle first (a create's) must not see the landed file as
    neither held nor stored: twice the quota for a mount until the next count."""
    sessions, (user, _), _ = env
    store = Bucket()
    ws = replica(sessions, tmp_path, store)
    row, _ = await ws.registry.find_or_make(Scope(user))
    await ws.claim_upload(user, row.id, "one.bin", 12 * MiB, 60)
    store.files[(row.id, "one.bin")] = 12 * MiB
    async with sessions() as db:  # the URL expires after its file landed
        await db.execute(update(WorkspaceUpload).values(
            expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
        await db.commit()
    assert await ws._share(user) == 4 * MiB  # as a create shares: still held
    assert await ws.free_quota(user) == 4 * MiB and await holds(sessions) == 0  # now counted


async def test_a_hold_of_a_workspace_deleted_meanwhile_holds_nothing(env, tmp_path):
    """A claim that committed just after a delete of its workspace (the two take different
    locks) leaves a row naming no workspace: it holds none of the quota."""
    sessions, (user, _), _ = env
    ws = replica(sessions, tmp_path, Bucket())
    async with sessions() as db:
        now = datetime.now(timezone.utc)
        db.add(WorkspaceUpload(id="wup_gone", workspace_id="wsp_gone", user_id=user,
                               path="x", size=12 * MiB, created_at=now,
                               expires_at=now + timedelta(hours=1)))
        await db.commit()
    assert await ws._share(user) == 16 * MiB


async def test_a_count_that_began_earlier_does_not_replace_a_later_one(env, tmp_path):
    """Two counts at once (two replicas settling): the one that began first, and so may miss a
    file that just landed, is not written over the one that began after."""
    sessions, (user, _), _ = env
    ws = replica(sessions, tmp_path, Bucket())
    row, _ = await ws.registry.find_or_make(Scope(user))
    now = datetime.now(timezone.utc)
    await ws.registry.record_usage(row.id, Usage(12 * MiB, 1), now)
    await ws.registry.record_usage(row.id, Usage(0, 0), now - timedelta(seconds=1))
    assert (await ws.registry.get(user, row.id)).bytes_used == 12 * MiB
