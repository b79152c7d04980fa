"""Sandbox lifecycle: create (cold or from the warm pool), destroy, idle and lifetime reaping,
and reconciliation with what is really running after a restart.

States: creating → configuring → booting → running → stopping → destroyed. Every step of a create
registers its undo; a failure halfway runs them in reverse, so nothing is left on the host.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Awaitable, Callable

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from e2a.config import Settings
from e2a.ids import new_id
from e2a.network import links
from e2a.network.firewall import Firewall, host_nameservers
from e2a.runtime import cgroups, rootfs
from e2a.runtime.runsc import Runsc, SandboxSpec
from e2a.sandboxes import envd
from e2a.sandboxes.hostlog import HostLog
from e2a.store.models import Sandbox
from e2a.templates import builder, recipes

log = logging.getLogger("e2a.sandboxes")

LIVE_STATES = ("creating", "configuring", "booting", "running", "stopping")


class NoCapacity(Exception):
    """This host cannot take another sandbox now (409)."""


class Unavailable(Exception):
    """The runtime cannot start sandboxes at all: runsc, envd or the template image missing (503)."""


@dataclass
class Live:
    """In-memory facts about a sandbox this server runs."""

    id: str
    link: links.Link
    token: str
    template: str
    internet: bool
    user_id: str | None
    idle_timeout: float
    expires_at: datetime
    last_activity: float = field(default_factory=time.monotonic)
    streams: int = 0  # open command streams, PTYs and proxied connections
    destroying: bool = False

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    @property
    def envd_url(self) -> str:
        return envd.base_url(self.link.sandbox_ip)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(dt: datetime) -> datetime:
    """SQLite hands datetimes back naive; they were stored as UTC."""
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


class Manager:
    def __init__(self, settings: Settings, sessions: async_sessionmaker):
        self.settings = settings
        self.sessions = sessions
        self.runsc = Runsc(settings.runsc, settings.run_dir / "runsc")
        self.addressing = links.Addressing(settings.instance, settings.subnet)
        self.firewall = Firewall(settings.instance, settings.subnet)
        self.hostlog = HostLog(settings.data_dir / "logs")
        self.http = envd.make_client()
        self.live: dict[str, Live] = {}
        self.slots: set[int] = set()
        self.pool: dict[str, list[str]] = {}  # template -> ready sandbox ids, oldest first
        self._pool_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.resolv_conf = settings.run_dir / "resolv.conf"

    # ---- startup and shutdown -------------------------------------------------------------

    async def start(self) -> None:
        for d in (self.settings.run_dir / "runsc", self.sandboxes_dir, self.settings.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.resolv_conf.write_text("".join(f"nameserver {ns}\n" for ns in host_nameservers()))
        await self.reconcile()
        self._tasks.append(asyncio.create_task(self._reaper(), name="reaper"))
        if self.settings.pool_size > 0:
            self._tasks.append(asyncio.create_task(self._pool_filler(), name="pool"))

    async def stop(self) -> None:
        """Stop background work; sandboxes keep running and are adopted at the next start."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.http.close()

    @property
    def sandboxes_dir(self) -> Path:
        # On disk, not under /run: it holds each sandbox's writable layer.
        return self.settings.data_dir / "sandboxes"

    def runtime_id(self, sandbox_id: str) -> str:
        return f"{self.settings.instance}-{sandbox_id}"

    def cgroup(self, sandbox_id: str) -> cgroups.Cgroup:
        return cgroups.Cgroup(self.settings.instance, self.runtime_id(sandbox_id))

    def layer(self, sandbox_id: str) -> rootfs.Layer:
        return rootfs.Layer(self.sandboxes_dir / sandbox_id)

    def check_runtime(self, recipe: recipes.Recipe) -> Path:
        if not self.runsc.available():
            raise Unavailable(f"runsc not found at {self.settings.runsc} (run `make build`)")
        if not Path(self.settings.envd).is_file():
            raise Unavailable(f"envd not found at {self.settings.envd} (run `make build`)")
        if not builder.is_built(self.settings.cache_dir, recipe):
            raise Unavailable(f"template {recipe.name!r} is not built (run `make templates`)")
        return builder.rootfs_path(self.settings.cache_dir, recipe)

    # ---- create ---------------------------------------------------------------------------

    async def create(self, *, user_id: str, recipe: recipes.Recipe, env_vars: dict[str, str],
                     metadata: dict[str, str], idle_timeout: int, max_lifetime: int,
                     internet: bool) -> Sandbox:
        claimed = await self._claim_from_pool(recipe, user_id=user_id, env_vars=env_vars,
                                              metadata=metadata, idle_timeout=idle_timeout,
                                              max_lifetime=max_lifetime, internet=internet)
        if claimed is not None:
            return claimed
        self.check_runtime(recipe)
        if len(self.live) >= self.settings.max_sandboxes:
            raise NoCapacity(f"this host runs its maximum of {self.settings.max_sandboxes} sandboxes")
        return await self._boot(user_id=user_id, recipe=recipe, env_vars=env_vars,
                                metadata=metadata, idle_timeout=idle_timeout,
                                max_lifetime=max_lifetime, internet=internet)

    def _take_slot(self) -> int:
        for slot in range(self.addressing.slots):
            if slot not in self.slots:
                self.slots.add(slot)
                return slot
        raise NoCapacity("no free network slot")

    async def _set_state(self, sandbox_id: str, state: str, **extra) -> None:
        async with self.sessions() as db:
            await db.execute(update(Sandbox).where(Sandbox.id == sandbox_id)
                             .values(state=state, **extra))
            await db.commit()

    async def _boot(self, *, user_id: str | None, recipe: recipes.Recipe, env_vars: dict,
                    metadata: dict, idle_timeout: int, max_lifetime: int,
                    internet: bool) -> Sandbox:
        image = self.check_runtime(recipe)
        now = utcnow()
        sid = new_id("sbx")
        slot = self._take_slot()
        link = self.addressing.link(slot, sid)
        token = secrets.token_urlsafe(32)
        row = Sandbox(
            id=sid, user_id=user_id, template=recipe.name, state="creating", vcpu=recipe.vcpu,
            cpu_fraction=recipe.cpu_fraction, memory_mib=recipe.memory_mib, internet=internet,
            metadata_=metadata, env_vars=env_vars, idle_timeout_seconds=idle_timeout,
            max_lifetime_seconds=max_lifetime, slot=slot, envd_token=token, created_at=now,
            expires_at=now + timedelta(seconds=max_lifetime),
        )
        undo: list[Callable[[], Awaitable[None]]] = []

        async def release_slot() -> None:
            self.slots.discard(slot)

        undo.append(release_slot)
        live = Live(id=sid, link=link, token=token, template=recipe.name, internet=internet,
                    user_id=user_id, idle_timeout=idle_timeout, expires_at=row.expires_at)
        t0 = time.perf_counter()
        marks: list[tuple[str, float]] = []

        def mark(step: str) -> None:
            marks.append((step, time.perf_counter()))

        try:
            async with self.sessions() as db:
                db.add(row)
                await db.commit()
            mark("db")

            async def mark_destroyed() -> None:
                await self._set_state(sid, "destroyed", destroyed_at=utcnow(),
                                      host_reason="create failed")

            undo.append(mark_destroyed)
            self.hostlog.write(sid, f"creating from template {recipe.name}")

            await self._set_state(sid, "configuring")
            await links.create(link)
            undo.append(lambda: links.destroy(link))
            if not internet:
                await self.firewall.set_internet(link.host_if, False)
                undo.append(lambda: self.firewall.set_internet(link.host_if, True))
            mark("network")

            await self._set_state(sid, "booting")
            platform = self.settings.platform or recipe.platform
            bundle = self.sandboxes_dir / sid
            cgroup = self.cgroup(sid)

            async def remove_cgroup() -> None:
                cgroup.remove()

            undo.append(remove_cgroup)
            undo.append(lambda: self._remove_dir(sid))
            layer = self.layer(sid)
            await layer.mount(image)
            undo.append(lambda: self.runsc.delete(self.runtime_id(sid)))
            await self.runsc.start(SandboxSpec(
                runtime_id=self.runtime_id(sid), bundle_dir=bundle, rootfs=layer.merged,
                netns_path=link.netns_path, envd_binary=Path(self.settings.envd),
                envd_token=token, memory_mib=recipe.memory_mib, platform=platform,
                resolv_conf=self.resolv_conf, cgroup=cgroup,
            ))
            mark("runsc")
            await envd.wait_ready(self.http, link.sandbox_ip, token)
            # The CPU quota starts now: boot work is e2a's, and it is CPU-bound.
            cgroup.set_cpu_quota(recipe.cpu_quota_us)
            if env_vars:
                await self._init_env(live, env_vars)
            mark("envd")
            self.live[sid] = live
            await self._set_state(sid, "running")
            mark("db")
            steps, prev = [], t0
            for step, at in marks:
                steps.append(f"{step} {1000 * (at - prev):.0f}")
                prev = at
            self.hostlog.write(sid, f"running (ip {link.sandbox_ip}, platform {platform}; boot "
                               f"{1000 * (prev - t0):.0f} ms: {', '.join(steps)} ms)")
            row.state = "running"
            return row
        except BaseException as exc:
            self.live.pop(sid, None)
            log.warning("create %s failed: %s", sid, exc)
            self.hostlog.write(sid, f"create failed: {exc}")
            for step in reversed(undo):
                try:
                    await asyncio.shield(step())
                except Exception as undo_exc:  # keep undoing the rest
                    log.error("undo step for %s failed: %s", sid, undo_exc)
            raise

    async def _init_env(self, live: Live, env_vars: dict[str, str]) -> None:
        async with self.http.post(live.envd_url + "/init", json={"env": env_vars},
                                  headers=envd.headers(live.token)) as r:
            r.raise_for_status()

    # ---- warm pool ------------------------------------------------------------------------

    async def _claim_from_pool(self, recipe: recipes.Recipe, *, user_id: str, env_vars: dict,
                               metadata: dict, idle_timeout: int, max_lifetime: int,
                               internet: bool) -> Sandbox | None:
        ready = self.pool.get(recipe.name)
        while ready:
            sid = ready.pop(0)
            self._pool_wakeup.set()
            live = self.live.get(sid)
            if live is None or live.destroying:
                continue
            try:
                if not internet:
                    await self.firewall.set_internet(live.link.host_if, False)
                if env_vars:
                    await self._init_env(live, env_vars)
            except Exception as exc:
                log.warning("pooled sandbox %s unusable: %s", sid, exc)
                await self.destroy(sid, "pool claim failed")
                continue
            now = utcnow()
            expires = now + timedelta(seconds=max_lifetime)
            live.user_id, live.internet = user_id, internet
            live.idle_timeout, live.expires_at = idle_timeout, expires
            live.touch()
            values = dict(user_id=user_id, internet=internet, env_vars=env_vars,
                          idle_timeout_seconds=idle_timeout, max_lifetime_seconds=max_lifetime,
                          created_at=now, expires_at=expires)
            # One Core UPDATE (the ORM's costs ~7 ms more here); the answer is built from what
            # is known, not read back.
            table = Sandbox.__table__
            async with self.sessions() as db:
                await db.execute(table.update().where(table.c.id == sid)
                                 .values(metadata=metadata, **values))
                await db.commit()
            # A plain record, not an ORM instance (whose construction costs ~2 ms here).
            row = SimpleNamespace(id=sid, template=recipe.name, state="running",
                                  vcpu=recipe.vcpu, cpu_fraction=recipe.cpu_fraction,
                                  memory_mib=recipe.memory_mib, metadata_=metadata,
                                  destroyed_at=None, **values)
            self.hostlog.write(sid, f"handed out from the warm pool to {user_id}")
            return row
        return None

    async def _pool_filler(self) -> None:
        """Keep `pool_size` sandboxes of every built template started and waiting."""
        while True:
            try:
                for name in recipes.available():
                    recipe = recipes.load(name)
                    if recipe is None or not builder.is_built(self.settings.cache_dir, recipe):
                        continue
                    ready = self.pool.setdefault(name, [])
                    while (len(ready) < self.settings.pool_size
                           and len(self.live) < self.settings.max_sandboxes):
                        row = await self._boot(user_id=None, recipe=recipe, env_vars={},
                                               metadata={}, idle_timeout=7200,
                                               max_lifetime=7200, internet=True)
                        await self._prewarm(row.id)
                        ready.append(row.id)
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

    async def _prewarm(self, sandbox_id: str) -> None:
        """Run the shell once, so the user's first command finds bash and its libraries
        already loaded in the sandbox's page cache (about 10 ms off the first command)."""
        live = self.live[sandbox_id]
        async with self.http.post(live.envd_url + "/commands", headers=envd.headers(live.token),
                                  json={"cmd": "true"}) as r:
            await r.read()

    # ---- destroy --------------------------------------------------------------------------

    async def destroy(self, sandbox_id: str, reason: str) -> None:
        live = self.live.get(sandbox_id)
        if live is not None:
            if live.destroying:
                return
            live.destroying = True
        async with self.sessions() as db:
            row = await db.get(Sandbox, sandbox_id)
        if row is None or row.state == "destroyed":
            self.live.pop(sandbox_id, None)
            return
        await self._set_state(sandbox_id, "stopping")
        self.hostlog.write(sandbox_id, f"stopping: {reason}")
        await self._teardown(row)
        self.live.pop(sandbox_id, None)
        for ready in self.pool.values():
            if sandbox_id in ready:
                ready.remove(sandbox_id)
        await self._set_state(sandbox_id, "destroyed", destroyed_at=utcnow(), host_reason=reason)
        self.hostlog.write(sandbox_id, f"destroyed: {reason}")

    async def _teardown(self, row: Sandbox) -> None:
        """Remove every host object of a sandbox; each step tolerates what is already gone."""
        await self.runsc.delete(self.runtime_id(row.id))
        if row.slot is not None:
            link = self.addressing.link(row.slot, row.id)
            await links.destroy(link)
            if not row.internet:
                await self.firewall.set_internet(link.host_if, True)
            self.slots.discard(row.slot)
        await self._remove_dir(row.id)
        self.cgroup(row.id).remove()

    async def _remove_dir(self, sandbox_id: str) -> None:
        """Unmount the sandbox's layer, then delete its directory (never through a mount)."""
        layer = self.layer(sandbox_id)
        await layer.unmount()
        if rootfs.is_mounted(layer.merged):
            log.error("cannot unmount %s; leaving its directory", layer.merged)
            return
        await asyncio.to_thread(shutil.rmtree, self.sandboxes_dir / sandbox_id, True)

    async def destroy_all(self, reason: str) -> None:
        await asyncio.gather(*(self.destroy(sid, reason) for sid in list(self.live)))

    # ---- idle and lifetime ----------------------------------------------------------------

    def touch(self, sandbox_id: str) -> None:
        live = self.live.get(sandbox_id)
        if live:
            live.touch()

    async def _running_commands(self, live: Live) -> int:
        data = await envd.get_json(self.http, live.envd_url + "/commands", live.token)
        return len(data.get("commands", [])) if data else 0

    async def _reap_once(self) -> None:
        now_wall, now = utcnow(), time.monotonic()
        for live in list(self.live.values()):
            if live.destroying or live.user_id is None:
                continue
            if now_wall >= live.expires_at:
                await self.destroy(live.id, "max_lifetime_seconds reached")
            elif live.streams == 0 and now - live.last_activity >= live.idle_timeout:
                if await self._running_commands(live):
                    live.touch()  # a command started through the API still runs
                else:
                    await self.destroy(live.id, "idle_timeout_seconds reached")

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval)
            try:
                await self._reap_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("reaper: %s", exc)

    # ---- reconciliation -------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Match the host to the DB after a restart or crash: adopt what runs and should,
        destroy what should not, and remove every orphan runsc sandbox, netns, veth, cgroup
        and sandbox directory of this instance."""
        await self.firewall.install(noinet=[])
        running = {c.get("id"): c for c in await self.runsc.list()
                   if c.get("status") == "running"}
        async with self.sessions() as db:
            rows = (await db.execute(select(Sandbox).where(Sandbox.state.in_(LIVE_STATES)))
                    ).scalars().all()
        kept: set[str] = set()
        noinet: list[str] = []
        for row in rows:
            link = self.addressing.link(row.slot, row.id) if row.slot is not None else None
            alive = (row.state == "running" and link is not None
                     and self.runtime_id(row.id) in running
                     and Path(link.netns_path).exists()
                     and aware(row.expires_at) > utcnow())
            if alive:
                try:
                    await envd.wait_ready(self.http, link.sandbox_ip, row.envd_token, 3.0)
                except TimeoutError:
                    alive = False
            if not alive:
                self.hostlog.write(row.id, "not running after a restart of e2a: cleaned up")
                await self._teardown(row)
                await self._set_state(row.id, "destroyed", destroyed_at=utcnow(),
                                      host_reason="lost at restart")
                continue
            kept.add(row.id)
            self.slots.add(row.slot)
            self.live[row.id] = Live(
                id=row.id, link=link, token=row.envd_token, template=row.template,
                internet=row.internet, user_id=row.user_id,
                idle_timeout=row.idle_timeout_seconds, expires_at=aware(row.expires_at))
            if row.user_id is None:
                self.pool.setdefault(row.template, []).append(row.id)
            if not row.internet:
                noinet.append(link.host_if)
            self.hostlog.write(row.id, "adopted after a restart of e2a")
        if noinet:
            await self.firewall.install(noinet=noinet)
        prefix = self.settings.instance + "-"
        kept_runtime = {self.runtime_id(s) for s in kept}
        for cid in {c.get("id") for c in await self.runsc.list()}:
            if cid and cid.startswith(prefix) and cid not in kept_runtime:
                await self.runsc.delete(cid)
        kept_netns = {self.live[s].link.netns for s in kept}
        for ns in links.existing_netns(self.settings.instance):
            if ns not in kept_netns:
                await links.destroy(links.Link(ns, "", "", ""))
        kept_ifs = {self.live[s].link.host_if for s in kept}
        for ifname in links.existing_host_ifs(self.settings.instance):
            if ifname not in kept_ifs:
                await links.destroy(links.Link("", ifname, "", ""))
        for d in self.sandboxes_dir.iterdir():
            if d.name not in kept:
                await self._remove_dir(d.name)
        for leaf in cgroups.leaves(self.settings.instance) - kept_runtime:
            cgroups.Cgroup(self.settings.instance, leaf).remove()
