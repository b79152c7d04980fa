"""The quota held by sized presigned PUTs (e2a/workspaces/service.py): a hold goes only once its
file is in a count of the workspace, whatever the order in which the upload lands."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from e2a.config import Settings
from e2a.workspaces.s3 import Usage
from e2a.workspaces.scope import Scope
from e2a.workspaces.service import QuotaExceeded, Workspaces
from tests.unit.stores import migrated, sqlite_url

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


@pytest.fixture
def anyio_backend():
    return "asyncio"


class LandsWhileCounted:
    """An S3 store where the uploaded file lands right after the first count of the workspace
    began (the PUT finishes while e2a lists the workspace)."""

    def __init__(self) -> None:
        self.files: dict[str, int] = {}
        self.pending: dict[str, int] = {}

    def usage(self, workspace_id: str) -> Usage:
        counted = Usage(sum(self.files.values()), len(self.files))
        self.files.update(self.pending)  # ... and the PUT completes just after
        self.pending.clear()
        return counted

    def stat(self, workspace_id: str, path: str):
        size = self.files.get(path)
        return None if size is None else (size, datetime.now(timezone.utc))


async def test_an_upload_landing_during_a_count_stays_held_until_counted(tmp_path):
    engine, sessions, (user, _) = await migrated(sqlite_url(tmp_path))
    try:
        ws = Workspaces(Settings(data_dir=tmp_path, backend="kubernetes",
                                 workspace_quota_mib=16), sessions)
        store = LandsWhileCounted()
        ws._endpoint, ws._store = "fake", store
        row, _ = await ws.registry.find_or_make(Scope(user))
        assert await ws.claim_upload(user, row.id, "one.bin", 12 * MiB, 600) == 16 * MiB
        store.pending["one.bin"] = 12 * MiB    # in flight: lands during the next count
        assert await ws.free_quota(user) == 4 * MiB   # held, then counted: never neither
        assert await ws.free_quota(user) == 4 * MiB   # counted, the hold let go
        assert not ws.uploads
        with pytest.raises(QuotaExceeded):
            await ws.claim_upload(user, row.id, "two.bin", 12 * MiB, 600)
    finally:
        await engine.dispose()
