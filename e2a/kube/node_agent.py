"""e2a's node agent: workspaces for the sandbox pods of one Kubernetes node (docs/kubernetes.md,
"Workspaces"), mounted as the embedded backend mounts them on its one host
(workspaces/mount.py): an rclone FUSE mount of the workspace's S3 prefix, its cache a btrfs
subvolume whose limit is the user's storage quota, bound into the pod (a hostPath volume) as
/home/user. The S3 keys stay here, in rclone's environment: the sandbox never sees them.

Run by `e2a node-agent` as root on each node (it mounts), listening on the node's address;
e2a's replicas call it with a bearer token (E2A_KUBE_NODE_TOKEN, compared in constant time),
the only way in: sandboxes may reach the node where the CNI enforces no policy.

    PUT    /v1/mounts/{sandbox}          {"workspace_id", "limit"} → {"path"}: mounted (again: same)
    PUT    /v1/mounts/{sandbox}/limit    {"limit"}: the cache's limit changed (the user's share)
    GET    /v1/mounts/{sandbox}/written  → {"bytes"}: what its cache holds
    DELETE /v1/mounts/{sandbox}          → {"lost"}: every file uploaded, unmounted, cache removed;
                                         503 while S3 cannot take them (the replica retries)
    GET    /v1/mounts                    → {"mounts": [{"sandbox_id", "workspace_id", "alive"}]}

Its state is its directory (<data_dir>/mounts, the btrfs pool): a restarted agent finds its
mounts there, and a mount whose rclone died is recovered by its DELETE (mount.py `close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
from pathlib import Path

from aiohttp import web

from e2a.runtime import quota
from e2a.sandboxes.resources import WorkspaceMount, remove_dir
from e2a.workspaces import s3
from e2a.workspaces.mount import Mount, MountError
from e2a.workspaces.s3 import Endpoint, S3Store
from e2a.workspaces.service import REMOTE

log = logging.getLogger("e2a.node_agent")

CACHE, ID_FILE = WorkspaceMount.CACHE, WorkspaceMount.ID_FILE  # a mount's files, as embedded
SANDBOX_ID = re.compile(r"^sbx_[a-z2-7]{1,28}$")
WORKSPACE_ID = re.compile(r"^wsp_[a-z2-7]{1,28}$")


class Agent:
    def __init__(self, settings):
        self.settings = settings
        self.root = settings.data_dir / "mounts"
        self.token = settings.kube_node_token.encode()
        self.store = S3Store(Endpoint.from_settings(settings))
        self._locks: dict[str, list] = {}  # sandbox -> [its lock, how many hold or await it]

    async def start(self) -> None:
        await quota.ensure_pool(self.root, self.settings.disk_gib)

    def mount(self, sandbox_id: str, workspace_id: str, limit: int = 0) -> Mount:
        return Mount(self.root / sandbox_id, self.settings.rclone,
                     self.store.rclone_env(REMOTE), self.store.remote(REMOTE, workspace_id),
                     limit)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=4096)
        app.add_routes([
            web.get("/v1/mounts", self.list),
            web.put("/v1/mounts/{sandbox}", self.put),
            web.put("/v1/mounts/{sandbox}/limit", self.limit),
            web.get("/v1/mounts/{sandbox}/written", self.written),
            web.delete("/v1/mounts/{sandbox}", self.delete),
        ])
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        auth = request.headers.get("Authorization", "")
        given = auth[len("Bearer "):].encode() if auth.startswith("Bearer ") else b""
        if not self.token or not given or not hmac.compare_digest(given, self.token):
            return _error(401, "a valid bearer token is required")
        sandbox = request.match_info.get("sandbox")
        if sandbox is not None and not SANDBOX_ID.match(sandbox):
            return _error(400, f"not a sandbox id: {sandbox[:40]!r}")
        return await handler(request)

    @contextlib.asynccontextmanager
    async def _lock(self, sandbox_id: str):
        """One request at a time per sandbox; the lock is dropped once nobody holds or awaits
        it (dropped earlier, a request waiting on it would run beside one on a new lock)."""
        entry = self._locks.setdefault(sandbox_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0 and self._locks.get(sandbox_id) is entry:
                del self._locks[sandbox_id]

    async def list(self, request: web.Request) -> web.Response:
        found = []
        table = quota.mount_table()  # read once, not once per mount
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            try:
                if SANDBOX_ID.match(d.name) and (d / ID_FILE).exists():
                    wid = (d / ID_FILE).read_text().strip()
                    found.append({"sandbox_id": d.name, "workspace_id": wid,
                                  "alive": self.mount(d.name, wid).alive(table)})
            except OSError:  # released meanwhile
                continue
        return web.json_response({"mounts": found})

    async def put(self, request: web.Request) -> web.Response:
        sid = request.match_info["sandbox"]
        body = await _json(request)
        wid, limit = body.get("workspace_id"), body.get("limit")
        if not isinstance(wid, str) or not WORKSPACE_ID.match(wid):
            return _error(400, "workspace_id: not a workspace id")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            return _error(400, "limit: must be an integer of bytes, at least 0")
        async with self._lock(sid):
            d = self.root / sid
            idf = d / ID_FILE
            if idf.exists() and idf.read_text().strip() != wid:
                return _error(409, f"{sid} has another workspace mounted")
            m = self.mount(sid, wid, limit)
            if m.alive():
                return web.json_response({"path": str(m.point)})
            d.mkdir(mode=0o700, exist_ok=True)
            idf.write_text(wid)
            try:
                if not quota.is_volume(d / CACHE):
                    await asyncio.to_thread(quota.create_volume, d / CACHE, limit)
                await m.start()
            except (MountError, OSError) as exc:  # the details stay here: a tenant reads the 503
                log.warning("%s: mounting %s failed: %s", sid, wid, exc)
                return _error(503, "mounting the workspace failed (see the node agent's log)")
        log.info("%s: workspace %s mounted", sid, wid)
        return web.json_response({"path": str(m.point)})

    async def limit(self, request: web.Request) -> web.Response:
        sid = request.match_info["sandbox"]
        limit = (await _json(request)).get("limit")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            return _error(400, "limit: must be an integer of bytes, at least 0")
        try:
            await asyncio.to_thread(quota.set_limit, self.root / sid / CACHE, limit)
        except OSError as exc:
            return _error(404, f"no mount of {sid}: {exc}")
        return web.json_response({"limit": limit})

    async def written(self, request: web.Request) -> web.Response:
        vfs = self.root / request.match_info["sandbox"] / CACHE / "vfs"
        n = await asyncio.to_thread(quota.allocated, vfs) if vfs.exists() else 0
        return web.json_response({"bytes": n})

    async def delete(self, request: web.Request) -> web.Response:
        sid = request.match_info["sandbox"]
        async with self._lock(sid):
            d = self.root / sid
            if not d.exists():
                return web.json_response({"lost": []})
            lost: list[str] = []
            idf = d / ID_FILE
            if idf.exists():
                try:
                    lost = await self.mount(sid, idf.read_text().strip()).close(
                        lambda: s3.run(self.store.answers))
                except MountError as exc:
                    log.warning("%s: workspace not flushed yet: %s", sid, exc)
                    return _error(503, "the workspace could not be uploaded yet (see the node "
                                  "agent's log)")
                if lost:
                    log.error("%s: S3 refused %d files for good, given up: %s", sid,
                              len(lost), ", ".join(lost[:20]))
            try:
                await remove_dir(d)
            except (OSError, RuntimeError) as exc:
                log.warning("%s: %s", sid, exc)
                return _error(503, "the mount's directory could not be removed yet")
        log.info("%s: workspace unmounted", sid)
        return web.json_response({"lost": lost})


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def serve(settings, host: str, port: int) -> None:
    agent = Agent(settings)
    await agent.start()
    runner = web.AppRunner(agent.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("node agent on %s:%d, mounts under %s", host, port, agent.root)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def check(settings) -> list[str]:
    """What the agent needs that the settings lack."""
    problems = []
    if not settings.kube_node_token:
        problems.append("E2A_KUBE_NODE_TOKEN must be set (the replicas' bearer token)")
    if not settings.s3_endpoint:
        problems.append("E2A_S3_ENDPOINT (and its keys) must be set: the workspaces' store")
    if not Path(settings.rclone).is_file():
        problems.append(f"rclone not found at {settings.rclone}")
    return problems
